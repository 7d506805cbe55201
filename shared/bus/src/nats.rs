//! NATS JetStream backend of the [`Bus`].
//!
//! # Layout on the server
//!
//! * Work queue `q` is the stream `DEVFLEET_Q_<q escaped>` holding the one
//!   subject `devfleet.q.<q>`, with work-queue retention, file storage and
//!   one replica. Stream names may not contain `.`, so the queue name is
//!   escaped: ASCII letters, digits and `-` stay, every other byte becomes
//!   `_XX` in hex (`work.dev` → `DEVFLEET_Q_work_2Edev`), which keeps distinct
//!   queues distinct.
//! * All consumers of a queue share one durable pull consumer, `workers`,
//!   with explicit acks. Work-queue retention allows one consumer per
//!   subject, and competing workers are exactly one logical consumer.
//! * Each dead-letter queue ([`crate::dead_letter_queue_for`]) is an ordinary queue of that shape; each
//!   dead-lettered copy carries its [`DeadLetterInfo`](crate::DeadLetterInfo)
//!   in `Devfleet-Dlq-*` headers (module `dead_letter`).
//! * Broadcasts are core NATS subjects: nothing is stored.
//!
//! # How the [`Bus`] guarantees are met
//!
//! * [`Bus::publish`] is a JetStream publish that waits for the stream's
//!   PubAck (the message is on the server's disk). Through a reconnect it is
//!   retried for up to [`PUBLISH_DEADLINE`]; every call carries one
//!   `Nats-Msg-Id`, so those retries do not store a message twice within the
//!   server's duplicate window (2 minutes).
//! * The delivery [`attempt`](crate::Delivery::attempt) is JetStream's own
//!   delivery count. A retry is a NAK with delay: the server redelivers after
//!   the delay and counts one more delivery.
//! * A delivery dropped unsettled, or held by a consumer that is dropped, is
//!   handed back with a NAK at once (after at most one pull-request expiry,
//!   see "Server compatibility"), and can no longer be settled. What a
//!   crashed process or a lost connection leaves unsettled comes back after
//!   the consumer's `ack_wait`.
//! * A poison message that crashes its worker every time is stopped by the
//!   consumer's `max_deliver` (`max_attempts`, or 20 when unlimited); when
//!   the server would deliver it once more it publishes a max-deliveries
//!   advisory instead, on which a consumer of the queue moves the message
//!   to the dead-letter queue (module `dead_letter`).
//! * `prefetch` is enforced by the client (module `consumer`): a consumer
//!   asks the server for no more messages than `prefetch` minus the
//!   deliveries it still holds unsettled.
//! * [`Bus::queue_depth`] is the durable's `num_pending`: messages never
//!   delivered yet. [`Bus::purge`] purges the stream, unsettled messages
//!   included.
//! * The durable has one configuration: the last [`Bus::consume`] on a queue
//!   sets `ack_wait` and `max_deliver` for all its consumers.

//! # Server compatibility
//!
//! Written for nats-server 2.9 and later. Only 2.9 APIs are used: the
//! async-nats `server_2_10`+ features stay off, consumers are created with
//! `$JS.API.CONSUMER.CREATE.<stream>.<name>`, pull requests use `batch`,
//! `expires` and `idle_heartbeat` only, and NAK delays need 2.7.1+.
//! nats-server 2.9 redelivers a message as new (delivery count 1) when the
//! only pull request waiting for it belongs to a consumer that is gone; pull
//! requests are therefore kept shorter than half the `ack_wait`, and a
//! dropped consumer's NAKs are delayed until its last request expired.
//! The server's `max_payload` (1 MiB by default) bounds a message below
//! [`MAX_PAYLOAD_BYTES`] unless the server is configured for more.

mod consumer;
mod dead_letter;
mod ledger;

use crate::{
    Bus, BusError, BusResult, ConsumeOptions, Consumer, Listener, MessageStream, MAX_PAYLOAD_BYTES,
};
use async_nats::jetstream::{self, consumer::pull, stream};
use async_nats::{HeaderMap, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long [`Bus::publish`] keeps retrying through a reconnect before it
/// reports [`BusError::PublishTimeout`].
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);

/// How long [`NatsBus::connect`] keeps trying an unreachable server.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(20);

/// Prefix of every queue's stream name.
const STREAM_PREFIX: &str = "DEVFLEET_Q_";
/// Prefix of every queue's subject.
const SUBJECT_PREFIX: &str = "devfleet.q.";
/// The one durable consumer every worker of a queue pulls from.
const CONSUMER: &str = "workers";
/// JetStream API request timeout, also the wait for a PubAck or an ack reply.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Deliveries JetStream makes of one message when the consumer asked for
/// unlimited attempts (`max_attempts == 0`): the crash-loop backstop.
const DEFAULT_MAX_DELIVER: i64 = 20;
/// Unsettled messages (held by workers or waiting out a NAK delay) the
/// shared durable allows across all workers of a queue. Each worker's own
/// `prefetch` is the real limit; this only has to be out of its way.
const MAX_ACK_PENDING: i64 = 10_000;
/// Room left for headers when checking a payload against the server's
/// `max_payload`.
const HEADER_ALLOWANCE: usize = 1024;

/// A bus on a NATS server with JetStream enabled. Cheap to share behind an
/// [`Arc`]; all clones of the [`crate::SharedBus`] use one connection.
pub struct NatsBus {
    inner: Arc<Inner>,
}

/// State shared by the bus, its consumers and their deliveries.
pub(crate) struct Inner {
    /// The server URL with any credentials removed, for error messages.
    url: String,
    client: async_nats::Client,
    js: jetstream::Context,
    shutdown: CancellationToken,
    /// Streams known to exist, with their durable consumer, by queue name.
    streams: Mutex<HashMap<String, stream::Stream>>,
    /// Bumped on every reconnect; consumers re-send their pull request when
    /// it changes, as a restarted server forgot it.
    connects: watch::Receiver<u64>,
}

impl NatsBus {
    /// Connects to the NATS server at `url` (`nats://[user:pass@]host:port`),
    /// retrying for up to [`CONNECT_DEADLINE`] while it is unreachable. Fails
    /// at once on a malformed URL or refused credentials. Once connected, the
    /// client reconnects by itself for as long as the bus lives.
    pub async fn connect(url: &str) -> BusResult<NatsBus> {
        let shown = redact(url);
        let (connects_tx, connects) = watch::channel(0u64);
        let connects_tx = Arc::new(connects_tx);
        // Only a connect after a disconnect is a reconnect.
        let was_down = Arc::new(AtomicBool::new(false));
        let options = async_nats::ConnectOptions::new()
            .name("devfleet")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            // Quicker than the default (up to 4 s) so consumers resume soon
            // after a broker restart.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100 * attempts.min(10) as u64)
            })
            .event_callback(move |event| {
                let connects_tx = Arc::clone(&connects_tx);
                let was_down = Arc::clone(&was_down);
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            if was_down.swap(false, Ordering::AcqRel) {
                                tracing::info!("nats: reconnected");
                                connects_tx.send_modify(|n| *n += 1);
                            }
                        }
                        async_nats::Event::Disconnected => {
                            was_down.store(true, Ordering::Release);
                            tracing::warn!("nats: disconnected; reconnecting");
                        }
                        other => tracing::debug!(event = %other, "nats: client event"),
                    }
                }
            });
        let deadline = Instant::now() + CONNECT_DEADLINE;
        let mut failures = 0;
        let client = loop {
            let error = match options.clone().connect(url).await {
                Ok(client) => break client,
                Err(e) => e,
            };
            use async_nats::ConnectErrorKind as Kind;
            let retry = matches!(error.kind(), Kind::Io | Kind::TimedOut);
            failures += 1;
            let pause = backoff(failures);
            if !retry || Instant::now() + pause >= deadline {
                let reason = error.to_string();
                return Err(if error.kind() == Kind::ServerParse {
                    BusError::InvalidUrl { url: shown, reason }
                } else {
                    BusError::Connect {
                        backend: "nats",
                        url: shown,
                        reason,
                    }
                });
            }
            tracing::debug!(url = %shown, %error, ?pause, "nats: server unreachable; retrying");
            tokio::time::sleep(pause).await;
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .build(client.clone());
        Ok(NatsBus {
            inner: Arc::new(Inner {
                url: shown,
                client,
                js,
                shutdown: CancellationToken::new(),
                streams: Mutex::new(HashMap::new()),
                connects,
            }),
        })
    }
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("url", &self.inner.url)
            .field("closed", &self.inner.shutdown.is_cancelled())
            .finish()
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn backend(&self) -> &'static str {
        "nats"
    }

    /// Stores `payload` in the queue's stream and waits for the PubAck.
    /// Retries through a reconnect for up to [`PUBLISH_DEADLINE`]; retries
    /// are de-duplicated by the server, so one call stores at most one copy
    /// within its 2-minute duplicate window.
    async fn publish(&self, queue: &str, payload: &[u8]) -> BusResult<()> {
        self.inner.check_open()?;
        check_queue(queue).map_err(|reason| BusError::Publish {
            queue: queue.to_owned(),
            reason,
        })?;
        self.inner.check_size(queue, payload.len())?;
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            uuid::Uuid::new_v4().simple().to_string().as_str(),
        );
        self.inner
            .publish_confirmed(queue, headers, Bytes::copy_from_slice(payload))
            .await
    }

    /// Starts a consumer on the queue's shared durable, first creating or
    /// updating it with `options.ack_wait` and the `max_deliver` derived
    /// from `options.max_attempts`. The durable has one configuration, so
    /// the last consumer started on a queue sets it for all.
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> BusResult<Consumer> {
        self.inner.check_open()?;
        check_queue(queue).map_err(|reason| BusError::Consume {
            queue: queue.to_owned(),
            reason,
        })?;
        let stream =
            consumer::NatsDeliveries::start(Arc::clone(&self.inner), queue, options).await?;
        Ok(Consumer::new(queue, Box::new(stream)))
    }

    /// Messages of the queue never yet delivered: the durable's
    /// `num_pending`. Unsettled messages, messages waiting out a NAK delay
    /// and messages waiting for redelivery after `ack_wait` are not counted.
    async fn queue_depth(&self, queue: &str) -> BusResult<u64> {
        self.inner.check_open()?;
        let failed = |reason: String| BusError::Consume {
            queue: queue.to_owned(),
            reason,
        };
        check_queue(queue).map_err(failed)?;
        let stream = self.inner.stream(queue).await.map_err(failed)?;
        match stream.consumer_info(CONSUMER).await {
            Ok(info) => Ok(info.num_pending),
            Err(e) => {
                // The stream or consumer may have been deleted behind our back.
                self.inner.forget(queue);
                Err(failed(format!("consumer info: {e}")))
            }
        }
    }

    /// Purges the queue's stream. Unlike RabbitMQ this also removes
    /// unsettled messages; settling one of those later is a harmless no-op.
    async fn purge(&self, queue: &str) -> BusResult<u64> {
        self.inner.check_open()?;
        let failed = |reason: String| BusError::Backend {
            backend: "nats",
            reason: format!("purging '{queue}': {reason}"),
        };
        check_queue(queue).map_err(failed)?;
        let stream = self.inner.stream(queue).await.map_err(failed)?;
        match stream.purge().await {
            Ok(response) => Ok(response.purged),
            Err(e) => {
                self.inner.forget(queue);
                Err(failed(e.to_string()))
            }
        }
    }

    /// Core NATS publish: sent to the listeners subscribed now, if any.
    async fn broadcast(&self, subject: &str, payload: &[u8]) -> BusResult<()> {
        self.inner.check_open()?;
        let failed = |reason: String| BusError::Backend {
            backend: "nats",
            reason: format!("broadcast on '{subject}': {reason}"),
        };
        check_subject(subject, false).map_err(failed)?;
        self.inner.check_size(subject, payload.len())?;
        self.inner
            .client
            .publish(subject.to_owned(), Bytes::copy_from_slice(payload))
            .await
            .map_err(|e| failed(e.to_string()))
    }

    /// Core NATS subscription on `pattern`. Returns once the server has
    /// registered it, so a broadcast sent after this returns is received.
    /// The subscription is renewed by the client after a reconnect;
    /// broadcasts sent while disconnected are missed.
    async fn listen(&self, pattern: &str) -> BusResult<Listener> {
        self.inner.check_open()?;
        let failed = |reason: String| BusError::Backend {
            backend: "nats",
            reason: format!("listening on '{pattern}': {reason}"),
        };
        check_subject(pattern, true).map_err(failed)?;
        let subscriber = self
            .inner
            .client
            .subscribe(pattern.to_owned())
            .await
            .map_err(|e| failed(e.to_string()))?;
        self.inner
            .client
            .flush()
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(Listener::new(Box::new(NatsListener {
            subscriber,
            shutdown: self.inner.shutdown.clone(),
        })))
    }

    /// Ends consumers and listeners (their `next` returns `None`), flushes
    /// what was sent and closes the connection.
    async fn close(&self) {
        if self.inner.shutdown.is_cancelled() {
            return;
        }
        self.inner.shutdown.cancel();
        if let Err(e) = self.inner.client.flush().await {
            tracing::debug!(error = %e, "nats: flush on close failed");
        }
        if let Err(e) = self.inner.client.drain().await {
            tracing::debug!(error = %e, "nats: drain on close failed");
        }
    }
}

impl Inner {
    fn check_open(&self) -> BusResult<()> {
        if self.shutdown.is_cancelled() {
            Err(BusError::Closed)
        } else {
            Ok(())
        }
    }

    /// Refuses a payload over [`MAX_PAYLOAD_BYTES`], or over what the
    /// server takes: its `max_payload` (1 MiB unless configured; at most
    /// 64 MiB) less room for our headers.
    fn check_size(&self, queue: &str, size: usize) -> BusResult<()> {
        let too_large = |limit| BusError::TooLarge {
            queue: queue.to_owned(),
            size,
            limit,
        };
        if size > MAX_PAYLOAD_BYTES {
            return Err(too_large(MAX_PAYLOAD_BYTES));
        }
        let server = self.payload_limit();
        if size > server {
            return Err(too_large(server));
        }
        Ok(())
    }

    /// The most payload bytes one message may carry on this server.
    fn payload_limit(&self) -> usize {
        let server = self.client.server_info().max_payload;
        if server == 0 {
            MAX_PAYLOAD_BYTES
        } else {
            MAX_PAYLOAD_BYTES.min(server.saturating_sub(HEADER_ALLOWANCE))
        }
    }

    /// The queue's stream, created with its durable consumer on first use.
    async fn stream(&self, queue: &str) -> Result<stream::Stream, String> {
        if let Some(stream) = self.lock_streams().get(queue) {
            return Ok(stream.clone());
        }
        let name = stream_name(queue);
        let stream = self
            .js
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![queue_subject(queue)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::Old,
                num_replicas: 1,
                description: Some(format!("devfleet work queue '{queue}'")),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("creating stream {name}: {e}"))?;
        // The durable exists from the first use on, so `queue_depth` works
        // before any worker started. A consumer's own settings replace these
        // defaults in `consume`.
        let _durable: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(CONSUMER, consumer_config(queue, &ConsumeOptions::default()))
            .await
            .map_err(|e| format!("creating consumer {name}/{CONSUMER}: {e}"))?;
        self.lock_streams().insert(queue.to_owned(), stream.clone());
        Ok(stream)
    }

    /// Forgets that the queue's stream exists, so the next use checks (and
    /// if need be recreates) it.
    fn forget(&self, queue: &str) {
        self.lock_streams().remove(queue);
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, stream::Stream>> {
        // The map holds no invariant a panic could break: use it anyway.
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes to `queue` and waits for the PubAck, retrying for up to
    /// [`PUBLISH_DEADLINE`]. `headers` should carry a `Nats-Msg-Id` so that
    /// retries are de-duplicated.
    async fn publish_confirmed(
        &self,
        queue: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> BusResult<()> {
        let deadline = Instant::now() + PUBLISH_DEADLINE;
        let subject = queue_subject(queue);
        let mut failures: u32 = 0;
        loop {
            let attempt = async {
                self.stream(queue).await?;
                let ack = self
                    .js
                    .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await
                    .map_err(|e| PublishFailure::from_publish(e, queue))?;
                ack.await
                    .map_err(|e| PublishFailure::from_publish(e, queue))
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let reason = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(BusError::Closed),
                outcome = tokio::time::timeout(remaining, attempt) => match outcome {
                    Ok(Ok(_ack)) => return Ok(()),
                    Ok(Err(PublishFailure::Fatal(e))) => return Err(e),
                    Ok(Err(PublishFailure::StreamMissing(reason))) => {
                        self.forget(queue);
                        reason
                    }
                    Ok(Err(PublishFailure::Retry(reason))) => reason,
                    Err(_elapsed) => "no confirm before the deadline".to_owned(),
                }
            };
            failures += 1;
            let pause = backoff(failures);
            if Instant::now() + pause >= deadline {
                tracing::warn!(queue, %reason, "nats: giving up on publish");
                return Err(BusError::PublishTimeout {
                    queue: queue.to_owned(),
                    timeout: PUBLISH_DEADLINE,
                });
            }
            tracing::debug!(queue, %reason, ?pause, "nats: publish failed; retrying");
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(BusError::Closed),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Why one publish attempt failed, and whether another may succeed.
enum PublishFailure {
    /// Will fail the same way again.
    Fatal(BusError),
    /// No stream took the message: recreate it, then retry.
    StreamMissing(String),
    /// Likely transient (disconnected, timed out): retry.
    Retry(String),
}

impl From<String> for PublishFailure {
    fn from(reason: String) -> Self {
        PublishFailure::Retry(reason)
    }
}

impl PublishFailure {
    fn from_publish(e: async_nats::jetstream::context::PublishError, queue: &str) -> Self {
        use async_nats::jetstream::context::PublishErrorKind as Kind;
        match e.kind() {
            Kind::StreamNotFound => PublishFailure::StreamMissing(e.to_string()),
            Kind::MaxPayloadExceeded => PublishFailure::Fatal(BusError::Publish {
                queue: queue.to_owned(),
                reason: e.to_string(),
            }),
            _ => PublishFailure::Retry(e.to_string()),
        }
    }
}

/// The durable consumer's configuration for `queue` and `options`.
fn consumer_config(queue: &str, options: &ConsumeOptions) -> pull::Config {
    pull::Config {
        durable_name: Some(CONSUMER.to_owned()),
        description: Some("devfleet workers".to_owned()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        ack_wait: options.ack_wait,
        max_deliver: max_deliver(queue, options.max_attempts),
        max_ack_pending: MAX_ACK_PENDING,
        ..Default::default()
    }
}

/// Deliveries JetStream makes of one message of `queue` before it gives up
/// and announces it (then moved to the dead-letter queue): `max_attempts`,
/// so the last allowed attempt is still delivered and its retry
/// dead-letters it with the worker's reason; [`DEFAULT_MAX_DELIVER`] when
/// attempts are unlimited, so that a message that crashes every worker
/// still ends. The dead-letter queue itself has no limit: there is nowhere
/// further to move a message to.
fn max_deliver(queue: &str, max_attempts: u32) -> i64 {
    if crate::is_dead_letter_queue(queue) {
        -1
    } else if max_attempts == 0 {
        DEFAULT_MAX_DELIVER
    } else {
        i64::from(max_attempts)
    }
}

/// The stream holding `queue`: [`STREAM_PREFIX`] plus the escaped name.
/// An escaped name longer than [`MAX_ESCAPED_NAME`] is cut and followed by
/// a hash of the whole name, to stay within the server's file-name limits.
fn stream_name(queue: &str) -> String {
    let mut escaped = String::with_capacity(queue.len() * 2);
    for byte in queue.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            escaped.push(char::from(byte));
        } else {
            escaped.push_str(&format!("_{byte:02X}"));
        }
    }
    if escaped.len() > MAX_ESCAPED_NAME {
        // Escaped text is ASCII, so any cut is a char boundary.
        escaped.truncate(MAX_ESCAPED_NAME - 18);
        escaped.push_str(&format!("_H{:016x}", fnv1a(queue.as_bytes())));
    }
    format!("{STREAM_PREFIX}{escaped}")
}

/// Longest escaped queue name used as is in a stream name.
const MAX_ESCAPED_NAME: usize = 200;

/// 64-bit FNV-1a: a hash that stays the same across processes and Rust
/// versions, as stream names must.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The subject messages of `queue` are published on.
fn queue_subject(queue: &str) -> String {
    format!("{SUBJECT_PREFIX}{queue}")
}

/// A queue name must be a literal subject (dot-separated, no wildcards)
/// no longer than the other backends allow.
fn check_queue(queue: &str) -> Result<(), String> {
    let limit = crate::memory::MAX_QUEUE_NAME_BYTES;
    if queue.len() > limit {
        return Err(format!(
            "queue name is {} bytes; the limit is {limit}",
            queue.len()
        ));
    }
    check_subject(queue, false).map_err(|reason| format!("invalid queue name: {reason}"))
}

/// Checks a subject, or with `pattern` a subscription pattern (`*` tokens,
/// a final `>`), before the server sees it.
fn check_subject(subject: &str, pattern: bool) -> Result<(), String> {
    if subject.is_empty() {
        return Err("empty subject".to_owned());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!("'{subject}' has an empty token"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("'{subject}' contains whitespace"));
        }
        let wildcard = *token == "*" || (*token == ">" && i + 1 == tokens.len());
        if wildcard && !pattern {
            return Err(format!("'{subject}' contains a wildcard"));
        }
        if !wildcard && token.contains(['*', '>']) {
            return Err(format!("'{subject}' misuses a wildcard"));
        }
    }
    Ok(())
}

/// Pause before retry number `failures` (1-based): 100 ms doubling to 2 s.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(5);
    Duration::from_millis(100u64 << exp).min(Duration::from_secs(2))
}

/// `url` without the user and password, for messages and logs.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// A broadcast listener: a core NATS subscription.
struct NatsListener {
    subscriber: Subscriber,
    shutdown: CancellationToken,
}

#[async_trait]
impl MessageStream for NatsListener {
    async fn next(&mut self) -> Option<(String, Bytes)> {
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            message = self.subscriber.next() => {
                message.map(|m| (m.subject.to_string(), m.payload))
            }
        }
    }
}

#[cfg(test)]
mod tests;
