//! In-process bus for the embedded single-process mode and fast tests.
//!
//! Behaves like the broker backends on the conformance suite: competing
//! consumers, per-consumer prefetch, unsettled deliveries handed back the
//! moment their delivery or consumer is dropped, delayed redelivery,
//! dead-lettering with a reason, and a delivery limit that dead-letters a
//! message which keeps crashing its consumers. Nothing survives the process.

use crate::{
    dead_letter_queue_for, is_dead_letter_queue, subject_matches, Bus, BusError, BusResult,
    ConsumeOptions, Consumer, DeadLetterInfo, Delivery, DeliveryStream, Listener, MessageStream,
    Settle, MAX_PAYLOAD_BYTES,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

/// How many times a message may be handed back unsettled (its consumer
/// dropped it or died) before it is dead-lettered instead of redelivered.
/// The same limit as the RabbitMQ backend's `x-delivery-limit`.
pub const DELIVERY_LIMIT: u32 = 20;

/// Longest queue name accepted; the RabbitMQ backend needs room for the
/// names of its delay queues, and this backend keeps the same rule.
pub(crate) const MAX_QUEUE_NAME_BYTES: usize = 200;

/// Broadcasts buffered per listener before a slow one starts missing some.
const BROADCAST_BUFFER: usize = 4096;

/// An in-process [`Bus`]. Clones share the same queues and subjects, so
/// services in one process connect by sharing one `MemoryBus`.
#[derive(Clone)]
pub struct MemoryBus {
    shared: Arc<Shared>,
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        let (broadcast, _) = broadcast::channel(BROADCAST_BUFFER);
        MemoryBus {
            shared: Arc::new(Shared {
                queues: Mutex::new(HashMap::new()),
                closed: CancellationToken::new(),
                broadcast,
            }),
        }
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("closed", &self.shared.closed.is_cancelled())
            .finish()
    }
}

struct Shared {
    queues: Mutex<HashMap<String, Queue>>,
    closed: CancellationToken,
    broadcast: broadcast::Sender<(String, Bytes)>,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Message>,
    /// Woken whenever a message becomes ready.
    changed: Arc<Notify>,
}

#[derive(Clone)]
struct Message {
    payload: Bytes,
    attempt: u32,
    /// Times it was handed back unsettled; see [`DELIVERY_LIMIT`].
    returns: u32,
    dead_letter: Option<DeadLetterInfo>,
}

impl Message {
    fn new(payload: Bytes) -> Self {
        Message {
            payload,
            attempt: 1,
            returns: 0,
            dead_letter: None,
        }
    }
}

impl Shared {
    fn queues(&self) -> MutexGuard<'_, HashMap<String, Queue>> {
        // A panic while holding this lock cannot leave a queue half-updated
        // (every critical section is a single push or pop), so a poisoned
        // lock is still consistent.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_open(&self) -> BusResult<()> {
        if self.closed.is_cancelled() {
            Err(BusError::Closed)
        } else {
            Ok(())
        }
    }

    fn push_back(&self, queue: &str, message: Message) {
        let mut queues = self.queues();
        let q = queues.entry(queue.to_owned()).or_default();
        q.ready.push_back(message);
        q.changed.notify_waiters();
    }

    /// Hands unsettled messages back to the front of their queue, in their
    /// original order, as the next attempt; a message past the delivery
    /// limit goes to the dead-letter queue instead.
    fn hand_back(&self, queue: &str, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let mut queues = self.queues();
        let mut dead = Vec::new();
        {
            let q = queues.entry(queue.to_owned()).or_default();
            for mut message in messages.into_iter().rev() {
                message.attempt += 1;
                message.returns += 1;
                if !is_dead_letter_queue(queue) && message.returns > DELIVERY_LIMIT {
                    dead.push(message);
                } else {
                    q.ready.push_front(message);
                }
            }
            q.changed.notify_waiters();
        }
        if !dead.is_empty() {
            let dlq = queues.entry(dead_letter_queue_for(queue)).or_default();
            for message in dead.into_iter().rev() {
                let info = DeadLetterInfo {
                    queue: queue.to_owned(),
                    reason: format!(
                        "delivery limit: handed back unsettled {} times",
                        message.returns
                    ),
                    attempts: message.attempt - 1,
                    at_ms: devfleet_protocol::now_ms(),
                };
                tracing::warn!(queue, reason = %info.reason, "dead-lettering a crash-looping message");
                dlq.ready.push_back(Message {
                    dead_letter: Some(info),
                    ..Message::new(message.payload)
                });
            }
            dlq.changed.notify_waiters();
        }
    }
}

/// The rule every backend applies to queue names: not empty, at most
/// [`MAX_QUEUE_NAME_BYTES`], and not in the namespace the RabbitMQ backend
/// keeps for its delay queues (kept here too, so code that works on memory
/// works on RabbitMQ).
pub(crate) fn check_queue_name(queue: &str) -> Result<(), String> {
    if queue.is_empty() {
        Err("queue name is empty".to_owned())
    } else if queue.len() > MAX_QUEUE_NAME_BYTES {
        Err(format!(
            "queue name is {} bytes; the limit is {MAX_QUEUE_NAME_BYTES}",
            queue.len()
        ))
    } else if queue.starts_with("devfleet.delay.") {
        Err("names starting with 'devfleet.delay.' are reserved for retry delays".to_owned())
    } else {
        Ok(())
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, queue: &str, payload: &[u8]) -> BusResult<()> {
        self.shared.check_open()?;
        check_queue_name(queue).map_err(|reason| BusError::Publish {
            queue: queue.to_owned(),
            reason,
        })?;
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(BusError::TooLarge {
                queue: queue.to_owned(),
                size: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        self.shared
            .push_back(queue, Message::new(Bytes::copy_from_slice(payload)));
        Ok(())
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> BusResult<Consumer> {
        self.shared.check_open()?;
        check_queue_name(queue).map_err(|reason| BusError::Consume {
            queue: queue.to_owned(),
            reason,
        })?;
        self.shared.queues().entry(queue.to_owned()).or_default();
        let holder = Arc::new(Holder {
            shared: self.shared.clone(),
            queue: queue.to_owned(),
            state: Mutex::new(HolderState {
                open: true,
                next_tag: 0,
                unsettled: HashMap::new(),
            }),
            settled: Notify::new(),
        });
        let stream = MemoryStream {
            holder,
            prefetch: usize::from(options.prefetch.max(1)),
            max_attempts: options.max_attempts,
        };
        Ok(Consumer::new(queue, Box::new(stream)))
    }

    async fn queue_depth(&self, queue: &str) -> BusResult<u64> {
        self.shared.check_open()?;
        let queues = self.shared.queues();
        Ok(queues.get(queue).map_or(0, |q| q.ready.len() as u64))
    }

    async fn purge(&self, queue: &str) -> BusResult<u64> {
        self.shared.check_open()?;
        let mut queues = self.shared.queues();
        Ok(queues.get_mut(queue).map_or(0, |q| {
            let n = q.ready.len() as u64;
            q.ready.clear();
            n
        }))
    }

    async fn broadcast(&self, subject: &str, payload: &[u8]) -> BusResult<()> {
        self.shared.check_open()?;
        // No listener is not an error: broadcasts are best effort.
        let _ = self
            .shared
            .broadcast
            .send((subject.to_owned(), Bytes::copy_from_slice(payload)));
        Ok(())
    }

    async fn listen(&self, pattern: &str) -> BusResult<Listener> {
        self.shared.check_open()?;
        Ok(Listener::new(Box::new(MemoryListener {
            pattern: pattern.to_owned(),
            receiver: self.shared.broadcast.subscribe(),
            closed: self.shared.closed.clone(),
        })))
    }

    async fn close(&self) {
        self.shared.closed.cancel();
    }
}

/// One consumer's unsettled deliveries. Shared by the consumer's stream and
/// its deliveries, so whichever goes first can hand messages back.
struct Holder {
    shared: Arc<Shared>,
    queue: String,
    state: Mutex<HolderState>,
    /// Woken when a delivery is settled, freeing prefetch room.
    settled: Notify,
}

struct HolderState {
    /// False once the consumer is dropped: its messages went back already.
    open: bool,
    next_tag: u64,
    unsettled: HashMap<u64, Message>,
}

impl Holder {
    fn state(&self) -> MutexGuard<'_, HolderState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes an unsettled message; `None` when the consumer was dropped
    /// and the message already handed back.
    fn take(&self, tag: u64) -> Option<Message> {
        let message = self.state().unsettled.remove(&tag);
        self.settled.notify_waiters();
        message
    }
}

struct MemoryStream {
    holder: Arc<Holder>,
    prefetch: usize,
    max_attempts: u32,
}

impl MemoryStream {
    /// Takes the next ready message if prefetch allows.
    fn try_take(&self) -> Option<(u64, Message)> {
        let mut state = self.holder.state();
        if state.unsettled.len() >= self.prefetch {
            return None;
        }
        let message = {
            let mut queues = self.holder.shared.queues();
            queues.get_mut(&self.holder.queue)?.ready.pop_front()?
        };
        let tag = state.next_tag;
        state.next_tag += 1;
        state.unsettled.insert(tag, message.clone());
        Some((tag, message))
    }
}

#[async_trait]
impl DeliveryStream for MemoryStream {
    async fn next(&mut self) -> Option<BusResult<Delivery>> {
        let shared = self.holder.shared.clone();
        loop {
            if shared.closed.is_cancelled() {
                return None;
            }
            let changed = {
                let mut queues = shared.queues();
                queues
                    .entry(self.holder.queue.clone())
                    .or_default()
                    .changed
                    .clone()
            };
            // Register for both wake-ups before looking, so a message or a
            // settle that lands in between is not missed.
            let ready = changed.notified();
            let settled = self.holder.settled.notified();
            tokio::pin!(ready, settled);
            ready.as_mut().enable();
            settled.as_mut().enable();
            if let Some((tag, message)) = self.try_take() {
                let settle = MemorySettle {
                    holder: self.holder.clone(),
                    tag,
                    settled: false,
                };
                return Some(Ok(Delivery::new(
                    self.holder.queue.clone(),
                    message.payload,
                    message.attempt,
                    message.dead_letter,
                    self.max_attempts,
                    Box::new(settle),
                )));
            }
            tokio::select! {
                _ = ready => {}
                _ = settled => {}
                _ = shared.closed.cancelled() => return None,
            }
        }
    }
}

impl Drop for MemoryStream {
    fn drop(&mut self) {
        let messages: Vec<Message> = {
            let mut state = self.holder.state();
            state.open = false;
            let mut held: Vec<(u64, Message)> = state.unsettled.drain().collect();
            held.sort_by_key(|(tag, _)| *tag);
            held.into_iter().map(|(_, m)| m).collect()
        };
        self.holder.shared.hand_back(&self.holder.queue, messages);
    }
}

/// Settles one memory delivery; dropping it unsettled hands it back.
struct MemorySettle {
    holder: Arc<Holder>,
    tag: u64,
    settled: bool,
}

impl MemorySettle {
    fn take(&mut self) -> BusResult<Message> {
        self.settled = true;
        self.holder.shared.check_open()?;
        self.holder.take(self.tag).ok_or_else(|| BusError::Settle {
            queue: self.holder.queue.clone(),
            reason: "its consumer was dropped; the message was already redelivered".to_owned(),
        })
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(mut self: Box<Self>) -> BusResult<()> {
        self.take().map(drop)
    }

    async fn redeliver(mut self: Box<Self>, delay: Duration, next_attempt: u32) -> BusResult<()> {
        let mut message = self.take()?;
        message.attempt = next_attempt;
        message.returns = 0;
        let shared = self.holder.shared.clone();
        let queue = self.holder.queue.clone();
        if delay.is_zero() {
            shared.push_back(&queue, message);
        } else {
            // A delayed message is in no queue until its timer fires, so it
            // does not count in `queue_depth`; it is lost if the bus closes.
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => shared.push_back(&queue, message),
                    _ = shared.closed.cancelled() => {}
                }
            });
        }
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, info: DeadLetterInfo) -> BusResult<()> {
        let message = self.take()?;
        self.holder.shared.push_back(
            &dead_letter_queue_for(&self.holder.queue),
            Message {
                dead_letter: Some(info),
                ..Message::new(message.payload)
            },
        );
        Ok(())
    }
}

impl Drop for MemorySettle {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let message = {
            let mut state = self.holder.state();
            if !state.open {
                return;
            }
            state.unsettled.remove(&self.tag)
        };
        self.holder.settled.notify_waiters();
        if let Some(message) = message {
            self.holder
                .shared
                .hand_back(&self.holder.queue, vec![message]);
        }
    }
}

struct MemoryListener {
    pattern: String,
    receiver: broadcast::Receiver<(String, Bytes)>,
    closed: CancellationToken,
}

#[async_trait]
impl MessageStream for MemoryListener {
    async fn next(&mut self) -> Option<(String, Bytes)> {
        loop {
            let received = tokio::select! {
                r = self.receiver.recv() => r,
                _ = self.closed.cancelled() => return None,
            };
            match received {
                Ok((subject, payload)) if subject_matches(&self.pattern, &subject) => {
                    return Some((subject, payload))
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(pattern = %self.pattern, missed, "slow listener missed broadcasts");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
