//! The devfleet message bus: work queues with at-least-once delivery, and
//! best-effort broadcast subjects, behind one API.
//!
//! Backends are chosen by URL ([`connect`]): `amqp://` RabbitMQ (lapin),
//! `nats://` NATS JetStream (async-nats), `memory://` in-process. All three
//! pass the same conformance suite (`tests/conformance.rs`).
//!
//! # Guarantees (every backend)
//!
//! * [`Bus::publish`] returns only after the broker confirmed the message
//!   durable; a confirmed message survives a broker restart (memory: lives
//!   as long as the process).
//! * A [`Delivery`] is settled exactly once: [`Delivery::ack`] after its
//!   effect is durable, [`Delivery::retry`] to redeliver after a delay, or
//!   [`Delivery::dead_letter`] to move it to [`DEAD_LETTER_QUEUE`] with a
//!   reason. A delivery that is never settled (consumer crashed or dropped)
//!   is redelivered: at once when it or its consumer is dropped, and after
//!   [`ConsumeOptions::ack_wait`] (NATS) or with the connection (AMQP) when
//!   the whole process died.
//! * [`Delivery::retry`] past [`ConsumeOptions::max_attempts`] dead-letters
//!   instead, with the reason of the last failure. That policy lives here,
//!   in one place; backends only implement the primitives of [`Settle`].
//! * Consumers reconnect with backoff after a broker restart and resume;
//!   deliveries from a lost connection are redelivered by the broker.
//! * An undecodable message read with [`Consumer::next_envelope`] is
//!   dead-lettered at once with the decode error; the consumer keeps going.
//! * Each delivery says what [`Deadline`] the broker holds it to: none
//!   (memory), one that [`Delivery::extend`] pushes back (NATS `ack_wait`:
//!   an in-progress ack), or a fixed one that nothing moves (RabbitMQ's
//!   node-wide `consumer_timeout`, after which the broker closes the
//!   channel and redelivers). Long work on a fixed deadline must be settled
//!   before it (the runtime's consume loop does that once the work is
//!   guarded elsewhere, e.g. by a claim in the store).

use async_trait::async_trait;
use bytes::Bytes;
use devfleet_protocol::{DecodeError, Envelope};
use std::sync::Arc;
use std::time::Duration;

pub mod amqp;
pub mod memory;
pub mod nats;
mod url;

pub use url::{connect, BusUrl};

/// The dead-letter queue of the default (empty) namespace; a namespace's
/// is `<namespace>.devfleet.dlq` (see [`dead_letter_queue_for`]). Each
/// dead-lettered message lands there with [`DeadLetterInfo`].
pub const DEAD_LETTER_QUEUE: &str = "devfleet.dlq";

/// Where messages of `queue` are dead-lettered: the dead-letter queue of
/// its namespace. A queue named `<namespace>.<q>`, where `q` is one of
/// devfleet's work queues ([`devfleet_protocol::queues::ALL_WORK_QUEUES`],
/// the names the runtime's `Connections::queue` prefixes), dead-letters to
/// `<namespace>.devfleet.dlq`; any other queue (a bare work queue, a
/// queue of no namespace) to [`DEAD_LETTER_QUEUE`]. A dead-letter queue
/// is its own.
pub fn dead_letter_queue_for(queue: &str) -> String {
    if is_dead_letter_queue(queue) {
        return queue.to_owned();
    }
    devfleet_protocol::queues::ALL_WORK_QUEUES
        .iter()
        .find_map(|q| {
            let namespace = queue.strip_suffix(q)?.strip_suffix('.')?;
            (!namespace.is_empty()).then(|| format!("{namespace}.{DEAD_LETTER_QUEUE}"))
        })
        .unwrap_or_else(|| DEAD_LETTER_QUEUE.to_owned())
}

/// True for [`DEAD_LETTER_QUEUE`] and every namespace's dead-letter queue.
pub fn is_dead_letter_queue(queue: &str) -> bool {
    queue == DEAD_LETTER_QUEUE
        || queue
            .strip_suffix(DEAD_LETTER_QUEUE)
            .is_some_and(|ns| ns.len() > 1 && ns.ends_with('.'))
}

/// Largest payload accepted by [`Bus::publish`], in bytes.
pub const MAX_PAYLOAD_BYTES: usize = devfleet_protocol::MAX_ENVELOPE_BYTES;

/// Result type of bus operations.
pub type BusResult<T> = Result<T, BusError>;

/// What went wrong talking to a broker. Each variant names the queue or URL.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid bus URL '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot connect to {backend} at {url}: {reason}")]
    Connect {
        backend: &'static str,
        url: String,
        reason: String,
    },
    #[error("publish to '{queue}' failed: {reason}")]
    Publish { queue: String, reason: String },
    #[error("publish to '{queue}' was not confirmed within {timeout:?}")]
    PublishTimeout { queue: String, timeout: Duration },
    #[error("payload for '{queue}' is {size} bytes; the limit is {limit}")]
    TooLarge {
        queue: String,
        size: usize,
        limit: usize,
    },
    #[error("consume from '{queue}' failed: {reason}")]
    Consume { queue: String, reason: String },
    #[error("settling a delivery from '{queue}' failed: {reason}")]
    Settle { queue: String, reason: String },
    #[error("bus is closed")]
    Closed,
    #[error("{backend}: {reason}")]
    Backend {
        backend: &'static str,
        reason: String,
    },
}

/// Per-consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    /// Most unsettled deliveries this consumer holds at once.
    pub prefetch: u16,
    /// [`Delivery::retry`] on a delivery whose attempt is already this high
    /// dead-letters it instead. 0 means never.
    pub max_attempts: u32,
    /// How long a delivery may stay unsettled before the broker assumes the
    /// consumer died and redelivers it (NATS `ack_wait`, restarted by each
    /// [`Delivery::extend`]; the other backends detect a dead consumer by
    /// its closed channel and ignore this).
    pub ack_wait: Duration,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        Self {
            prefetch: 16,
            max_attempts: 0,
            ack_wait: Duration::from_secs(60),
        }
    }
}

impl ConsumeOptions {
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }
}

/// Why and where from a message was dead-lettered. Present on deliveries
/// read from [`DEAD_LETTER_QUEUE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// The queue the message was dead-lettered from.
    pub queue: String,
    pub reason: String,
    /// Deliveries made before it was dead-lettered.
    pub attempts: u32,
    pub at_ms: i64,
}

/// A message bus: durable work queues plus best-effort broadcast.
///
/// Queues are created on first use by either side; any number of consumers
/// on one queue compete for its messages.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// `amqp`, `nats` or `memory`.
    fn backend(&self) -> &'static str;

    /// Publishes one message to a work queue and waits for the broker's
    /// confirm. Retries through a reconnect until a deadline, then errors;
    /// an error means the message may not have been stored.
    async fn publish(&self, queue: &str, payload: &[u8]) -> BusResult<()>;

    /// Starts a consumer on a work queue.
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> BusResult<Consumer>;

    /// Messages waiting in a queue (not counting unsettled or delayed ones).
    async fn queue_depth(&self, queue: &str) -> BusResult<u64>;

    /// Removes every waiting message of a queue; returns how many.
    async fn purge(&self, queue: &str) -> BusResult<u64>;

    /// Sends a message to every current listener of `subject`. Best effort:
    /// nothing is stored, a listener that is not there misses it.
    async fn broadcast(&self, subject: &str, payload: &[u8]) -> BusResult<()>;

    /// Listens on subjects matching a NATS-style pattern (`a.*.c`, `a.>`).
    async fn listen(&self, pattern: &str) -> BusResult<Listener>;

    /// Closes connections; later calls fail with [`BusError::Closed`].
    async fn close(&self);
}

/// A shared handle to some bus.
pub type SharedBus = Arc<dyn Bus>;

/// How long a broker lets a delivery stay unsettled before it presumes the
/// consumer dead and redelivers the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// No deadline: held until settled, dropped, or its consumer closes
    /// (memory).
    None,
    /// [`ConsumeOptions::ack_wait`], restarted by each [`Delivery::extend`]
    /// (NATS: an in-progress ack).
    Extendable,
    /// A deadline set on the broker that the client cannot move (RabbitMQ's
    /// node-wide `consumer_timeout`, 30 minutes by default): a delivery
    /// held longer is redelivered and can no longer be settled.
    Fixed,
}

/// Backend side of a delivery: the primitives each backend implements.
/// Consumers use [`Delivery`]'s methods, which hold the shared policy.
#[async_trait]
pub trait Settle: Send + Sync {
    /// The broker's deadline for this delivery (see [`Deadline`]).
    fn deadline(&self) -> Deadline {
        Deadline::None
    }
    /// Tells the broker the delivery is still being worked on, restarting
    /// its [`Deadline::Extendable`] deadline; a no-op for other deadlines.
    async fn extend(&self) -> BusResult<()> {
        Ok(())
    }
    /// Removes the message for good.
    async fn ack(self: Box<Self>) -> BusResult<()>;
    /// Redelivers after at least `delay`, as attempt `next_attempt`.
    async fn redeliver(self: Box<Self>, delay: Duration, next_attempt: u32) -> BusResult<()>;
    /// Moves the message to its queue's dead-letter queue
    /// ([`dead_letter_queue_for`]) with `info`, durably, then removes it
    /// from its queue.
    async fn dead_letter(self: Box<Self>, info: DeadLetterInfo) -> BusResult<()>;
}

/// One message handed to a consumer; settle it exactly once.
pub struct Delivery {
    pub payload: Bytes,
    /// The queue it came from.
    pub queue: String,
    /// 1 on first delivery; counts redeliveries and retries.
    pub attempt: u32,
    /// Set on messages read from [`DEAD_LETTER_QUEUE`].
    pub dead_letter: Option<DeadLetterInfo>,
    max_attempts: u32,
    settle: Box<dyn Settle>,
}

/// What [`Delivery::retry`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// It will be redelivered after the delay.
    Scheduled,
    /// It had used its attempts and was dead-lettered.
    DeadLettered,
}

impl Delivery {
    /// Builds a delivery; for backends.
    pub fn new(
        queue: impl Into<String>,
        payload: Bytes,
        attempt: u32,
        dead_letter: Option<DeadLetterInfo>,
        max_attempts: u32,
        settle: Box<dyn Settle>,
    ) -> Self {
        Self {
            payload,
            queue: queue.into(),
            attempt: attempt.max(1),
            dead_letter,
            max_attempts,
            settle,
        }
    }

    /// The broker's deadline for this delivery.
    pub fn deadline(&self) -> Deadline {
        self.settle.deadline()
    }

    /// Restarts the delivery's deadline when it is
    /// [`Deadline::Extendable`] (call it more often than
    /// [`ConsumeOptions::ack_wait`] while working); a no-op otherwise.
    pub async fn extend(&self) -> BusResult<()> {
        self.settle.extend().await
    }

    /// Acknowledges: the effect of this message is durable.
    pub async fn ack(self) -> BusResult<()> {
        self.settle.ack().await
    }

    /// Redelivers after `delay`, or dead-letters with `reason` when this was
    /// the last allowed attempt.
    pub async fn retry(self, delay: Duration, reason: &str) -> BusResult<RetryOutcome> {
        if self.max_attempts > 0 && self.attempt >= self.max_attempts {
            let info = DeadLetterInfo {
                queue: self.queue.clone(),
                reason: format!("gave up after {} attempts: {reason}", self.attempt),
                attempts: self.attempt,
                at_ms: devfleet_protocol::now_ms(),
            };
            self.settle.dead_letter(info).await?;
            return Ok(RetryOutcome::DeadLettered);
        }
        self.settle.redeliver(delay, self.attempt + 1).await?;
        Ok(RetryOutcome::Scheduled)
    }

    /// Moves the message to the dead-letter queue with `reason`.
    pub async fn dead_letter(self, reason: &str) -> BusResult<()> {
        let info = DeadLetterInfo {
            queue: self.queue.clone(),
            reason: reason.to_owned(),
            attempts: self.attempt,
            at_ms: devfleet_protocol::now_ms(),
        };
        self.settle.dead_letter(info).await
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("attempt", &self.attempt)
            .field("bytes", &self.payload.len())
            .field("dead_letter", &self.dead_letter)
            .finish()
    }
}

/// Backend side of a consumer.
#[async_trait]
pub trait DeliveryStream: Send {
    /// The next delivery; `None` once the consumer is closed for good.
    /// Transient broker failures are retried inside, not returned.
    async fn next(&mut self) -> Option<BusResult<Delivery>>;
}

/// A consumer on one queue. Dropping it closes it; its unsettled
/// deliveries are redelivered to other consumers.
pub struct Consumer {
    queue: String,
    inner: Box<dyn DeliveryStream>,
}

impl Consumer {
    /// Wraps a backend stream; for backends.
    pub fn new(queue: impl Into<String>, inner: Box<dyn DeliveryStream>) -> Self {
        Self {
            queue: queue.into(),
            inner,
        }
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next raw delivery; `None` when the consumer closed.
    pub async fn next(&mut self) -> Option<BusResult<Delivery>> {
        self.inner.next().await
    }

    /// The next delivery that decodes as an [`Envelope`]. Undecodable ones
    /// are dead-lettered with the decode error and skipped.
    pub async fn next_envelope(&mut self) -> Option<BusResult<(Envelope, Delivery)>> {
        loop {
            let delivery = match self.inner.next().await? {
                Ok(d) => d,
                Err(e) => return Some(Err(e)),
            };
            match Envelope::decode(&delivery.payload) {
                Ok(env) => return Some(Ok((env, delivery))),
                Err(err) => {
                    let reason = undecodable_reason(&err);
                    tracing::warn!(queue = %self.queue, %reason, "dead-lettering undecodable message");
                    if let Err(e) = delivery.dead_letter(&reason).await {
                        return Some(Err(e));
                    }
                }
            }
        }
    }
}

fn undecodable_reason(err: &DecodeError) -> String {
    format!("undecodable message: {err}")
}

/// Backend side of a broadcast listener.
#[async_trait]
pub trait MessageStream: Send {
    /// The next `(subject, payload)`; `None` once closed.
    async fn next(&mut self) -> Option<(String, Bytes)>;
    /// Broadcasts dropped so far because the reader fell behind (where the
    /// backend counts them).
    fn dropped(&self) -> u64 {
        0
    }
}

/// Receives broadcasts. Slow listeners may miss messages (best effort):
/// each backend holds a bounded backlog per listener (AMQP and memory:
/// 4096 broadcasts, dropping the oldest; NATS: the client's subscription
/// capacity, dropping the newest) and never buffers without bound.
pub struct Listener {
    inner: Box<dyn MessageStream>,
}

impl Listener {
    pub fn new(inner: Box<dyn MessageStream>) -> Self {
        Self { inner }
    }
    /// The next `(subject, payload)`; `None` once the bus closed.
    pub async fn next(&mut self) -> Option<(String, Bytes)> {
        self.inner.next().await
    }

    /// Broadcasts dropped so far because this listener fell behind (AMQP
    /// counts them; other backends report 0 and log what they miss).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped()
    }
}

/// True when `subject` matches a NATS-style `pattern`: `*` is one token,
/// a final `>` is one or more tokens.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Publishes an envelope; encodes it first. An envelope over
/// [`MAX_PAYLOAD_BYTES`], or over what the server takes, is
/// [`BusError::TooLarge`]: it will never fit, so do not retry it.
pub async fn publish_envelope(bus: &dyn Bus, queue: &str, envelope: &Envelope) -> BusResult<()> {
    let bytes = envelope.encode().map_err(|e| match e {
        // Typed, so a caller can tell "never fits" from "try again".
        devfleet_protocol::EncodeError::TooLarge { size, limit, .. } => BusError::TooLarge {
            queue: queue.to_owned(),
            size,
            limit,
        },
        e => BusError::Publish {
            queue: queue.to_owned(),
            reason: e.to_string(),
        },
    })?;
    bus.publish(queue, &bytes).await
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn each_namespace_has_its_own_dead_letter_queue() {
        use super::{dead_letter_queue_for as dlq, is_dead_letter_queue};
        assert_eq!(dlq("work.dev"), "devfleet.dlq");
        assert_eq!(dlq("team-a.work.dev"), "team-a.devfleet.dlq");
        assert_eq!(dlq("a.b.task.finally_failed"), "a.b.devfleet.dlq");
        assert_eq!(dlq("team-a.devfleet.dlq"), "team-a.devfleet.dlq");
        assert_eq!(dlq("devfleet.dlq"), "devfleet.dlq");
        // Not a devfleet work queue: the shared one.
        assert_eq!(dlq("conf-123"), "devfleet.dlq");
        assert_eq!(dlq(".work.dev"), "devfleet.dlq");
        assert!(is_dead_letter_queue("x.devfleet.dlq"));
        assert!(!is_dead_letter_queue("xdevfleet.dlq"));
        assert!(!is_dead_letter_queue(".devfleet.dlq"));
    }

    #[test]
    fn subject_patterns() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.b", "a.c"));
    }
}
