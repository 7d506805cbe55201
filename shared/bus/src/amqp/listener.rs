//! Listening to broadcasts: a private queue bound to the broadcast exchange.
//!
//! The queue is exclusive and auto-delete, so it vanishes with the
//! listener. Broadcasts sent while the connection is down are missed (best
//! effort); the listener binds a new queue after a reconnect.
//!
//! The broker pushes broadcasts (no acks) as fast as they come, and lapin
//! queues them without bound, so a pump task drains them at once into a
//! buffer of [`LISTENER_BUFFER`] broadcasts. When the reader falls that far
//! behind, the oldest are dropped (broadcasts are lossy by contract),
//! counted ([`crate::Listener::dropped`]) and logged.

use super::link::{close_in_background, op, short, Fault, Link, Pacer};
use super::topology::{self, BROADCAST_EXCHANGE};
use crate::{subject_matches, MessageStream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

/// Broadcasts a listener holds for its reader at most; when more arrive,
/// the oldest are dropped.
pub const LISTENER_BUFFER: usize = 4096;

struct Active {
    channel: Channel,
    /// Moves deliveries from the lapin consumer into the buffer.
    _pump: AbortOnDropHandle<()>,
}

/// What the pump hands the reader.
#[derive(Default)]
struct Buffer {
    state: Mutex<Buffered>,
    /// A broadcast arrived, or the pump stopped.
    ready: Notify,
}

#[derive(Default)]
struct Buffered {
    items: VecDeque<(String, Bytes)>,
    dropped: u64,
    /// The pump's consumer ended: bind again.
    lost: bool,
}

impl Buffer {
    fn state(&self) -> MutexGuard<'_, Buffered> {
        // Each critical section is a single queue update.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, pattern: &str, item: (String, Bytes)) {
        let mut state = self.state();
        if state.items.len() >= LISTENER_BUFFER {
            state.items.pop_front();
            state.dropped += 1;
            let dropped = state.dropped;
            drop(state);
            if dropped == 1 || dropped.is_multiple_of(1000) {
                tracing::warn!(
                    %pattern,
                    dropped,
                    buffer = LISTENER_BUFFER,
                    "slow broadcast listener: dropping the oldest broadcasts"
                );
            }
            let mut state = self.state();
            state.items.push_back(item);
        } else {
            state.items.push_back(item);
        }
        self.ready.notify_one();
    }

    fn lost(&self) {
        self.state().lost = true;
        self.ready.notify_one();
    }
}

/// Drains `consumer` into `buffer` until it ends.
async fn pump(mut consumer: lapin::Consumer, pattern: String, buffer: Arc<Buffer>) {
    loop {
        match consumer.next().await {
            Some(Ok(delivery)) => {
                let subject = delivery.routing_key.as_str();
                if subject_matches(&pattern, subject) {
                    buffer.push(&pattern, (subject.to_owned(), Bytes::from(delivery.data)));
                }
            }
            Some(Err(e)) => {
                tracing::warn!(%pattern, error = %e, "listener lost its channel; binding again");
                break;
            }
            None => break,
        }
    }
    buffer.lost();
}

async fn subscribe(link: &Link, pattern: &str, buffer: &Arc<Buffer>) -> Result<Active, Fault> {
    let session = link.open_channel().await?;
    let result = async {
        topology::declare_broadcast(link, &session).await?;
        let queue = op(
            "queue.declare",
            session.channel.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        op(
            "queue.bind",
            session.channel.queue_bind(
                queue.name().clone(),
                BROADCAST_EXCHANGE.into(),
                short(&topology::binding_key(pattern))?,
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        op(
            "basic.consume",
            session.channel.basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
    }
    .await;
    match result {
        Ok(consumer) => {
            buffer.state().lost = false;
            Ok(Active {
                channel: session.channel,
                _pump: AbortOnDropHandle::new(tokio::spawn(pump(
                    consumer,
                    pattern.to_owned(),
                    buffer.clone(),
                ))),
            })
        }
        Err(fault) => {
            link.note(session.generation, &fault).await;
            Err(fault)
        }
    }
}

/// The [`MessageStream`] of one broadcast listener.
pub(super) struct AmqpListener {
    link: Arc<Link>,
    pattern: String,
    active: Option<Active>,
    buffer: Arc<Buffer>,
    pacer: Pacer,
}

impl AmqpListener {
    /// Binds the listener's queue, retrying transient failures until
    /// `deadline`; broadcasts sent after this returns reach it.
    pub(super) async fn start(
        link: Arc<Link>,
        pattern: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Self, Fault> {
        let buffer = Arc::new(Buffer::default());
        let active = link
            .retry("listen", Some(deadline), || {
                subscribe(&link, pattern, &buffer)
            })
            .await?;
        Ok(AmqpListener {
            link,
            pattern: pattern.to_owned(),
            active: Some(active),
            buffer,
            pacer: Pacer::new(),
        })
    }

    fn drop_active(&mut self) {
        if let Some(active) = self.active.take() {
            drop(active._pump);
            close_in_background(active.channel, "listener closed");
        }
        self.pacer.failed();
    }
}

#[async_trait]
impl MessageStream for AmqpListener {
    async fn next(&mut self) -> Option<(String, Bytes)> {
        let closed = self.link.closed().clone();
        loop {
            if closed.is_cancelled() {
                return None;
            }
            let (item, lost) = {
                let mut state = self.buffer.state();
                (state.items.pop_front(), state.lost)
            };
            if let Some(item) = item {
                return Some(item);
            }
            if lost && self.active.is_some() {
                self.drop_active();
            }
            if self.active.is_none() {
                if !self.pacer.wait(&closed).await {
                    return None;
                }
                match subscribe(&self.link, &self.pattern, &self.buffer).await {
                    Ok(active) => {
                        self.active = Some(active);
                        self.pacer.succeeded();
                    }
                    Err(Fault::Closed) => return None,
                    Err(fault) => {
                        tracing::debug!(pattern = %self.pattern, reason = %fault.reason(), "listener resubscribe failed; retrying");
                        self.pacer.failed();
                    }
                }
                continue;
            }
            tokio::select! {
                _ = self.buffer.ready.notified() => {}
                _ = closed.cancelled() => return None,
            }
        }
    }

    fn dropped(&self) -> u64 {
        self.buffer.state().dropped
    }
}

impl Drop for AmqpListener {
    fn drop(&mut self) {
        self.drop_active();
    }
}
