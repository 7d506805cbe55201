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
//! Pull requests expire after [`PULL_EXPIRES`] and ask for idle heartbeats
//! every [`PULL_HEARTBEAT`]. A reconnect, silence for [`PULL_LOST_AFTER`], or
//! an error status means the request is gone (a restarted server forgets
//! it), and a new one is sent; "no responders" or "consumer deleted" first
//! recreates the stream and durable. Failures back off from 100 ms to 2 s.
//! None of this is returned to the caller: `next` just waits.

use super::{backoff, consumer_config, dead_letter, Inner, CONSUMER};
use crate::{
    BusError, BusResult, ConsumeOptions, DeadLetterInfo, Delivery, DeliveryStream, Settle,
    DEAD_LETTER_QUEUE,
};
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subscriber};
use async_trait::async_trait;
use futures::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long the server keeps one pull request open.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Idle heartbeat asked of the server while a pull request is open.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which an open pull request is presumed lost. A safety
/// net only (a reconnect already triggers a new request), so generous:
/// presuming too early leaves two requests open, and the consumer may then
/// hold more than `prefetch`.
const PULL_LOST_AFTER: Duration = Duration::from_secs(8);

/// Deliveries handed out and not yet settled (or dropped).
struct Held {
    count: AtomicUsize,
    /// Signalled when one is settled: room for another pull.
    freed: Notify,
}

/// One unit of [`Held`]; releases it when dropped.
struct HeldSlot(Arc<Held>);

impl HeldSlot {
    fn take(held: &Arc<Held>) -> Self {
        held.count.fetch_add(1, Ordering::AcqRel);
        HeldSlot(Arc::clone(held))
    }
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
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
    held: Arc<Held>,
    /// Messages the open pull request may still bring; 0 when none is open.
    requested: usize,
    /// When the server last showed that the open pull request is alive.
    last_heard: Instant,
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
    }
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
        let mut connects = inner.connects.clone();
        connects.mark_unchanged();
        // Nothing moves messages out of the dead-letter queue itself.
        let mover = (queue != DEAD_LETTER_QUEUE)
            .then(|| dead_letter::spawn_mover(Arc::clone(&inner), queue.to_owned()));
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
            held: Arc::new(Held {
                count: AtomicUsize::new(0),
                freed: Notify::new(),
            }),
            requested: 0,
            last_heard: Instant::now(),
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
            PULL_EXPIRES.as_nanos(),
            PULL_HEARTBEAT.as_nanos()
        );
        self.inner
            .client
            .publish_with_reply(
                self.next_subject.clone(),
                self.inbox.clone(),
                request.into(),
            )
            .await
            .map_err(|e| format!("sending pull request: {e}"))?;
        self.requested = batch;
        self.last_heard = Instant::now();
        Ok(())
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

    /// Turns one message from the inbox into a delivery; `None` (logged) if
    /// it is not a JetStream message.
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
        let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
        let dead_letter = dead_letter::info_from_headers(message.headers.as_ref());
        let payload = message.payload.clone();
        let settle = NatsSettle {
            inner: Arc::clone(&self.inner),
            queue: self.queue.clone(),
            stream_sequence,
            message,
            _slot: HeldSlot::take(&self.held),
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
            let held = self.held.count.load(Ordering::Acquire);
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
            let lost_at = self.last_heard + PULL_LOST_AFTER;
            let connects = self.connects.as_mut();
            let watch_connects = connects.is_some();
            let wake = tokio::select! {
                // The inbox first: heartbeats that queued up while the
                // caller was busy prove the request alive before the
                // silence timer is looked at.
                biased;
                _ = self.inner.shutdown.cancelled() => return None,
                message = subscriber.next() => Wake::Inbox(message),
                _ = self.held.freed.notified(), if !open => Wake::Freed,
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
/// settled or dropped.
struct NatsSettle {
    inner: Arc<Inner>,
    queue: String,
    stream_sequence: u64,
    message: jetstream::Message,
    _slot: HeldSlot,
}

impl NatsSettle {
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
}

#[async_trait]
impl Settle for NatsSettle {
    /// ACK, confirmed by the server: the message is removed from the stream.
    async fn ack(self: Box<Self>) -> BusResult<()> {
        self.reply(AckKind::Ack).await
    }

    /// NAK with `delay`: the server redelivers after it. The attempt number
    /// is the server's delivery count, which will be `next_attempt`.
    async fn redeliver(self: Box<Self>, delay: Duration, _next_attempt: u32) -> BusResult<()> {
        self.reply(AckKind::Nak(Some(delay))).await
    }

    /// Stores a copy in the dead-letter queue (PubAck awaited), then ACKs
    /// the original. If the ACK fails the original comes back and may be
    /// dead-lettered again; the copy's message id makes the server drop
    /// that second copy within its duplicate window.
    async fn dead_letter(self: Box<Self>, info: DeadLetterInfo) -> BusResult<()> {
        let id = dead_letter::message_id(&self.queue, self.stream_sequence);
        dead_letter::store(&self.inner, &info, &id, self.message.payload.clone())
            .await
            .map_err(|e| BusError::Settle {
                queue: self.queue.clone(),
                reason: format!("copying to the dead-letter queue: {e}"),
            })?;
        self.reply(AckKind::Ack).await
    }
}
