//! A worker's pull loop on a queue's shared durable consumer, and the
//! settling of what it delivers.
//!
//! The loop owns one inbox subscription and keeps at most one pull request
//! open on it, asking for `prefetch` minus the deliveries still unsettled;
//! a new request goes out when the last one is used up or expired, or when
//! a delivery is settled while none is open. So a consumer holds at most
//! `prefetch` unsettled deliveries, except briefly after a reconnect, when
//! a request the server still had may be answered next to the new one.
//!
//! Pull requests expire after [`pull_expires`] (at most half the
//! `ack_wait`, see there) and ask for idle heartbeats twice as often. A
//! reconnect, silence for [`PULL_LOST_AFTER`] past the expiry, or an error
//! status means the request is gone (a restarted server forgets it), and a
//! new one is sent; "no responders" or "consumer deleted" first
//! recreates the stream and durable. Failures back off from 100 ms to 2 s.
//! None of this is returned to the caller: `next` just waits.
//!
//! Dropping the consumer, or a delivery unsettled, hands the message back
//! at once ([`ledger`](super::ledger)); so do the messages that reached the
//! inbox but were not handed out yet. `ack_wait` only covers what a
//! crashed process or a lost connection leaves behind.

use super::ledger::{self, Ledger};
use super::{backoff, consumer_config, dead_letter, Inner, CONSUMER};
use crate::{
    BusError, BusResult, ConsumeOptions, DeadLetterInfo, Deadline, Delivery, DeliveryStream, Settle,
};
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subscriber};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Longest time the server keeps one pull request open.
const MAX_PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Shortest: requests are renewed this often at most.
const MIN_PULL_EXPIRES: Duration = Duration::from_millis(500);
/// Silence past a pull request's expiry after which it is presumed lost.
/// A safety net only (a reconnect already triggers a new request), so
/// generous: presuming too early leaves two requests open, and the
/// consumer may then hold more than `prefetch`.
const PULL_LOST_AFTER: Duration = Duration::from_secs(3);
/// Margin added to a dropped consumer's last pull request's expiry before
/// its messages are redelivered (see [`pull_expires`]).
const EXPIRY_MARGIN: Duration = Duration::from_millis(200);

/// How long each pull request stays open: half the `ack_wait`, within
/// [`MIN_PULL_EXPIRES`]..=[`MAX_PULL_EXPIRES`].
///
/// Why: nats-server 2.9 mishandles a redelivery whose only waiting pull
/// request belongs to a consumer that is gone: it rewinds the consumer and
/// redelivers the message as new, with delivery count 1 (`loopAndGatherMsgs`
/// decrements `o.sseq` even for a redelivered message). A gone consumer's
/// request must therefore end before anything of its can be redelivered:
/// before `ack_wait` runs out (hence half of it), and before the messages
/// it hands back on drop return (hence their NAK delay, see `Drop`).
fn pull_expires(ack_wait: Duration) -> Duration {
    if ack_wait.is_zero() {
        // The server's default ack_wait, 30 s, applies.
        return MAX_PULL_EXPIRES;
    }
    (ack_wait / 2).clamp(MIN_PULL_EXPIRES, MAX_PULL_EXPIRES)
}

/// The [`DeliveryStream`] of a NATS consumer.
pub(super) struct NatsDeliveries {
    inner: Arc<Inner>,
    queue: String,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`.
    next_subject: String,
    options: ConsumeOptions,
    inbox: String,
    subscriber: Option<Subscriber>,
    ledger: Arc<Ledger>,
    /// Messages the open pull request may still bring; 0 when none is open.
    requested: usize,
    /// When the server last showed that the open pull request is alive.
    last_heard: Instant,
    /// When the last pull request was sent, and how long it lives.
    pulled_at: Instant,
    expires: Duration,
    /// `None` once the client is gone.
    connects: Option<watch::Receiver<u64>>,
    /// Recreate the stream and durable before the next pull.
    needs_setup: bool,
    failures: u32,
    /// Moves messages that hit `max_deliver` to the dead-letter queue.
    mover: Option<JoinHandle<()>>,
}

impl Drop for NatsDeliveries {
    fn drop(&mut self) {
        if let Some(mover) = &self.mover {
            mover.abort();
        }
        let mut subjects = self.ledger.close();
        subjects.extend(
            self.subscriber
                .take()
                .map(drain_deliveries)
                .unwrap_or_default(),
        );
        // While our last pull request may still be waiting on the server,
        // a redelivery must not find it (see `pull_expires`).
        let delay = if self.requested > 0 {
            (self.pulled_at + self.expires + EXPIRY_MARGIN)
                .saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        };
        ledger::hand_back(&self.inner.client, subjects, delay);
    }
}

/// The ack subjects of the deliveries already waiting in an inbox.
fn drain_deliveries(mut subscriber: Subscriber) -> Vec<async_nats::Subject> {
    let mut subjects = Vec::new();
    while let Some(Some(message)) = subscriber.next().now_or_never() {
        if matches!(message.status, None | Some(StatusCode::OK)) {
            subjects.extend(message.reply);
        }
    }
    subjects
}

impl NatsDeliveries {
    /// Creates or updates the queue's durable with `options` and returns
    /// the consumer's stream of deliveries; fails if the server cannot be
    /// asked now.
    pub(super) async fn start(
        inner: Arc<Inner>,
        queue: &str,
        options: ConsumeOptions,
    ) -> BusResult<NatsDeliveries> {
        let expires = pull_expires(options.ack_wait);
        let mut connects = inner.connects.clone();
        connects.mark_unchanged();
        // Nothing moves messages out of the dead-letter queue itself. The
        // mover subscribes before our first pull request, so it cannot miss
        // an advisory that request causes.
        let mover = if crate::is_dead_letter_queue(queue) {
            None
        } else {
            Some(
                dead_letter::start_mover(Arc::clone(&inner), queue.to_owned())
                    .await
                    .map_err(|reason| BusError::Consume {
                        queue: queue.to_owned(),
                        reason,
                    })?,
            )
        };
        let mut deliveries = NatsDeliveries {
            next_subject: format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.{CONSUMER}",
                super::stream_name(queue)
            ),
            inbox: inner.client.new_inbox(),
            inner,
            queue: queue.to_owned(),
            options,
            subscriber: None,
            ledger: Arc::new(Ledger::new()),
            requested: 0,
            last_heard: Instant::now(),
            pulled_at: Instant::now(),
            expires,
            connects: Some(connects),
            needs_setup: true,
            failures: 0,
            mover,
        };
        deliveries
            .setup()
            .await
            .map_err(|reason| BusError::Consume {
                queue: queue.to_owned(),
                reason,
            })?;
        Ok(deliveries)
    }

    /// Makes sure the stream and the durable (with our options) exist, and
    /// that the inbox is subscribed.
    async fn setup(&mut self) -> Result<(), String> {
        if self.needs_setup {
            let stream = self.inner.stream(&self.queue).await?;
            stream
                .create_consumer(consumer_config(&self.queue, &self.options))
                .await
                .map_err(|e| {
                    self.inner.forget(&self.queue);
                    format!("configuring consumer {CONSUMER}: {e}")
                })?;
            self.needs_setup = false;
        }
        if self.subscriber.is_none() {
            self.inbox = self.inner.client.new_inbox();
            let subscriber = self
                .inner
                .client
                .subscribe(self.inbox.clone())
                .await
                .map_err(|e| format!("subscribing to the pull inbox: {e}"))?;
            self.subscriber = Some(subscriber);
            self.requested = 0;
        }
        Ok(())
    }

    /// Asks the server for up to `batch` messages on our inbox.
    async fn pull(&mut self, batch: usize) -> Result<(), String> {
        let request = format!(
            r#"{{"batch":{batch},"expires":{},"idle_heartbeat":{}}}"#,
            self.expires.as_nanos(),
            (self.expires / 2).as_nanos()
        );
        // Counted as open before it is sent: if `next` is cancelled while
        // sending, a second request must not follow the first.
        self.requested = batch;
        self.last_heard = Instant::now();
        self.pulled_at = self.last_heard;
        let sent = self
            .inner
            .client
            .publish_with_reply(
                self.next_subject.clone(),
                self.inbox.clone(),
                request.into(),
            )
            .await;
        sent.map_err(|e| {
            self.requested = 0;
            format!("sending pull request: {e}")
        })
    }

    /// Waits out a failure's backoff; false if the bus closed meanwhile.
    async fn pause(&mut self, reason: &str) -> bool {
        self.failures += 1;
        let pause = backoff(self.failures);
        tracing::debug!(queue = %self.queue, %reason, ?pause, "nats: consumer retrying");
        tokio::select! {
            _ = self.inner.shutdown.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }

    /// Turns one message from the inbox into a delivery; `None` if it is
    /// not a JetStream message (logged) or a stale copy of one acked
    /// already.
    fn delivery(&self, message: async_nats::Message) -> Option<Delivery> {
        let message = jetstream::Message {
            message,
            context: self.inner.js.clone(),
        };
        let (delivered, stream_sequence) = match message.info() {
            Ok(info) => (info.delivered, info.stream_sequence),
            Err(e) => {
                tracing::warn!(queue = %self.queue, error = %e, "nats: dropping a message without JetStream metadata");
                return None;
            }
        };
        let ack_subject = message.reply.clone()?;
        if self.ledger.was_acked(stream_sequence) {
            tracing::debug!(queue = %self.queue, stream_sequence, "nats: skipping a stale copy of an acked message");
            return None;
        }
        let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
        let dead_letter = dead_letter::info_from_headers(message.headers.as_ref());
        let payload = message.payload.clone();
        let settle = NatsSettle {
            inner: Arc::clone(&self.inner),
            queue: self.queue.clone(),
            stream_sequence,
            message,
            id: self.ledger.hand_out(ack_subject),
            ledger: Arc::clone(&self.ledger),
            settled: false,
        };
        Some(Delivery::new(
            self.queue.clone(),
            payload,
            attempt,
            dead_letter,
            self.options.max_attempts,
            Box::new(settle),
        ))
    }
}

#[async_trait]
impl DeliveryStream for NatsDeliveries {
    async fn next(&mut self) -> Option<BusResult<Delivery>> {
        loop {
            if self.inner.shutdown.is_cancelled() {
                return None;
            }
            if let Err(reason) = self.setup().await {
                if !self.pause(&reason).await {
                    return None;
                }
                continue;
            }
            let prefetch = usize::from(self.options.prefetch.max(1));
            let held = self.ledger.unsettled();
            if self.requested == 0 && held < prefetch {
                if let Err(reason) = self.pull(prefetch - held).await {
                    if !self.pause(&reason).await {
                        return None;
                    }
                    continue;
                }
            }
            let Some(subscriber) = self.subscriber.as_mut() else {
                continue;
            };
            let open = self.requested > 0;
            let lost_at = self.last_heard + self.expires + PULL_LOST_AFTER;
            let connects = self.connects.as_mut();
            let watch_connects = connects.is_some();
            let wake = tokio::select! {
                // The inbox first: heartbeats that queued up while the
                // caller was busy prove the request alive before the
                // silence timer is looked at.
                biased;
                _ = self.inner.shutdown.cancelled() => return None,
                message = subscriber.next() => Wake::Inbox(message),
                _ = self.ledger.freed.notified(), if !open => Wake::Freed,
                _ = tokio::time::sleep_until(lost_at), if open => Wake::Silent,
                changed = async {
                    match connects {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                }, if watch_connects => Wake::Connected(changed),
            };
            match wake {
                Wake::Inbox(Some(message)) => {
                    if let Some(delivery) = self.on_message(message).await? {
                        return Some(Ok(delivery));
                    }
                }
                Wake::Inbox(None) => {
                    // The client dropped the subscription (closing, or a
                    // slow consumer): subscribe anew.
                    self.subscriber = None;
                    self.requested = 0;
                }
                Wake::Freed => {}
                Wake::Silent => {
                    tracing::debug!(queue = %self.queue, "nats: pull request went silent; re-sending");
                    self.requested = 0;
                }
                // A (re)connected server may have forgotten our request.
                Wake::Connected(true) => self.requested = 0,
                Wake::Connected(false) => self.connects = None,
            }
        }
    }
}

/// What woke the pull loop.
enum Wake {
    Inbox(Option<async_nats::Message>),
    Freed,
    Silent,
    Connected(bool),
}

impl NatsDeliveries {
    /// Handles one message on the inbox: a delivery, or a status about the
    /// open pull request. The outer `None` means the bus closed.
    async fn on_message(&mut self, message: async_nats::Message) -> Option<Option<Delivery>> {
        self.last_heard = Instant::now();
        match message.status {
            None | Some(StatusCode::OK) => {
                self.requested = self.requested.saturating_sub(1);
                self.failures = 0;
                return Some(self.delivery(message));
            }
            Some(StatusCode::IDLE_HEARTBEAT) => {}
            // The request expired (or, no_wait, found nothing).
            Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => self.requested = 0,
            Some(StatusCode::NO_RESPONDERS) => {
                // Nothing serves the consumer's subject: recreate it.
                self.requested = 0;
                self.needs_setup = true;
                self.inner.forget(&self.queue);
                if !self.pause("no responders for pull requests").await {
                    return None;
                }
            }
            Some(status) => {
                // 409: consumer deleted, too many waiting pulls, leadership
                // change, ...
                let reason = format!(
                    "pull request ended: {status} {}",
                    message.description.as_deref().unwrap_or("")
                );
                self.requested = 0;
                if reason.contains("Consumer Deleted") {
                    self.needs_setup = true;
                    self.inner.forget(&self.queue);
                }
                if !self.pause(&reason).await {
                    return None;
                }
            }
        }
        Some(None)
    }
}

/// Settles one delivery; holds its place in the consumer's prefetch until
/// settled, and hands the message back if dropped unsettled.
struct NatsSettle {
    inner: Arc<Inner>,
    queue: String,
    stream_sequence: u64,
    message: jetstream::Message,
    ledger: Arc<Ledger>,
    id: u64,
    settled: bool,
}

impl NatsSettle {
    /// Takes the delivery off its consumer's book; fails if the consumer
    /// was dropped and handed the message back already.
    fn begin(&mut self) -> BusResult<()> {
        self.settled = true;
        if self.ledger.settle(self.id) {
            Ok(())
        } else {
            Err(BusError::Settle {
                queue: self.queue.clone(),
                reason: "its consumer was dropped and handed the message back for redelivery"
                    .to_owned(),
            })
        }
    }

    /// Sends `kind` and waits for the server to confirm it got it.
    async fn reply(&self, kind: AckKind) -> BusResult<()> {
        self.message
            .double_ack_with(kind)
            .await
            .map_err(|e| BusError::Settle {
                queue: self.queue.clone(),
                reason: e.to_string(),
            })
    }

    /// ACKs and remembers it, so a stale copy is not handed out again.
    async fn ack_confirmed(&self) -> BusResult<()> {
        self.reply(AckKind::Ack).await?;
        self.ledger.acked(self.stream_sequence);
        Ok(())
    }
}

impl Drop for NatsSettle {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Some(subject) = self.ledger.drop_unsettled(self.id) {
            ledger::hand_back(&self.inner.client, vec![subject], Duration::ZERO);
        }
    }
}

#[async_trait]
impl Settle for NatsSettle {
    fn deadline(&self) -> Deadline {
        Deadline::Extendable
    }

    /// An in-progress ack (`+WPI`): the server restarts the message's
    /// `ack_wait`. Sent without waiting for a reply; a lost one is made up
    /// by the next.
    async fn extend(&self) -> BusResult<()> {
        self.message
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| BusError::Settle {
                queue: self.queue.clone(),
                reason: format!("in-progress ack: {e}"),
            })
    }

    /// ACK, confirmed by the server: the message is removed from the stream.
    async fn ack(mut self: Box<Self>) -> BusResult<()> {
        self.begin()?;
        self.ack_confirmed().await
    }

    /// NAK with `delay`: the server redelivers after it. The attempt number
    /// is the server's delivery count, which will be `next_attempt`.
    async fn redeliver(mut self: Box<Self>, delay: Duration, _next_attempt: u32) -> BusResult<()> {
        self.begin()?;
        self.reply(AckKind::Nak(Some(delay))).await
    }

    /// Stores a copy in the dead-letter queue (PubAck awaited), then ACKs
    /// the original. If the ACK fails the original comes back and may be
    /// dead-lettered again; the copy's message id makes the server drop
    /// that second copy within its duplicate window.
    async fn dead_letter(mut self: Box<Self>, info: DeadLetterInfo) -> BusResult<()> {
        self.begin()?;
        let id = dead_letter::message_id(&self.queue, self.stream_sequence);
        dead_letter::store(&self.inner, &info, &id, self.message.payload.clone())
            .await
            .map_err(|e| BusError::Settle {
                queue: self.queue.clone(),
                reason: format!("copying to the dead-letter queue: {e}"),
            })?;
        self.ack_confirmed().await
    }
}
