//! The one envelope consume loop services use for their work queues.
//!
//! [`consume`] reads envelopes with a bounded number of handlers in flight,
//! runs each handler in a span linked to the publisher's trace, and settles
//! the delivery with the [`Settlement`] the handler returned: ack once the
//! effect is durable, retry with backoff on a transient failure, redeliver
//! after a chosen delay (a wait, not a failure), dead-letter what can never
//! succeed. On shutdown it stops reading, lets in-flight handlers finish,
//! then closes the consumer, so nothing is acked unfinished.

use crate::backoff::Backoff;
use crate::Connections;
use devfleet_bus::{BusError, ConsumeOptions, Delivery, RetryOutcome};
use devfleet_protocol::Envelope;
use devfleet_store::StoreError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

/// What to do with a delivery once its handler returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The effect is durable (or there was nothing to do).
    Ack,
    /// A transient failure; redeliver after a backoff (dead-lettered past
    /// the queue's attempt limit).
    Retry(String),
    /// Redeliver after exactly this delay (not a failure: a wait).
    Delay(Duration, String),
    /// It can never succeed; move it to the dead-letter queue.
    DeadLetter(String),
}

impl Settlement {
    /// Settlement for a store error: transient backend errors are retried,
    /// a transition that no longer applies means the message is stale
    /// (acked), and a message about nothing that exists is dead-lettered.
    pub fn from_store_error(what: &str, err: StoreError) -> Settlement {
        match err {
            StoreError::Backend(_) | StoreError::Connect { .. } => {
                Settlement::Retry(format!("{what}: {err}"))
            }
            StoreError::InvalidState { .. } => {
                tracing::warn!(error = %err, "{what}: stale message, nothing to do");
                Settlement::Ack
            }
            _ => Settlement::DeadLetter(format!("{what}: {err}")),
        }
    }

    /// Settlement for a failed publish: always retried (the broker either
    /// confirms or not).
    pub fn from_publish_error(what: &str, err: anyhow::Error) -> Settlement {
        Settlement::Retry(format!("{what}: {err:#}"))
    }
}

/// Why a step of a handler did not finish: the store failed, or a message
/// could not be published. `?` converts a [`StoreError`] into it.
#[derive(Debug)]
pub enum StepError {
    Store(StoreError),
    Publish(anyhow::Error),
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        StepError::Store(e)
    }
}

impl StepError {
    /// The settlement of a delivery whose handler stopped at this error
    /// (see [`Settlement::from_store_error`] and
    /// [`Settlement::from_publish_error`]).
    pub fn settlement(self, what: &str) -> Settlement {
        match self {
            StepError::Store(e) => Settlement::from_store_error(what, e),
            StepError::Publish(e) => Settlement::from_publish_error(what, e),
        }
    }
}

/// Retry policy for transient handler failures and consumer restarts.
const HANDLER_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    factor: 2.0,
    cap: Duration::from_secs(30),
    jitter: 0.5,
};

/// Where a consume loop reads and how.
pub struct Source {
    pub connections: Connections,
    /// Logical queue (namespace applied by [`Connections`]).
    pub queue: &'static str,
    /// Consumer options; the prefetch is set to `concurrency`.
    pub options: ConsumeOptions,
    /// Handlers in flight at most (at least one).
    pub concurrency: usize,
}

/// Consumes a queue until `shutdown`, running `handler` on each envelope
/// and settling its delivery with the returned [`Settlement`].
///
/// Undecodable messages are dead-lettered by the bus. On shutdown no new
/// envelope is taken, in-flight handlers finish and settle, and only then
/// is the consumer closed. Returns an error only when the bus is closed for
/// good while the loop was meant to run on; broker outages are ridden out
/// (the consumer is restarted with backoff).
pub async fn consume<S, H, Fut>(
    source: Source,
    state: Arc<S>,
    shutdown: CancellationToken,
    handler: H,
) -> anyhow::Result<()>
where
    S: Send + Sync + 'static,
    H: Fn(Arc<S>, Envelope) -> Fut + Send + Sync + Copy + 'static,
    Fut: Future<Output = Settlement> + Send + 'static,
{
    let concurrency = source.concurrency.max(1);
    let queue = source.connections.queue(source.queue);
    let options = source
        .options
        .clone()
        .prefetch(u16::try_from(concurrency).unwrap_or(u16::MAX));
    let limit = Arc::new(Semaphore::new(concurrency));
    let tracker = TaskTracker::new();
    // Kept open until every in-flight handler settled its delivery.
    let mut consumer = None;
    let mut failures = 0u32;
    let result = 'outer: loop {
        let mut current = match consumer.take() {
            Some(c) => c,
            None => {
                let attempt = tokio::select! {
                    _ = shutdown.cancelled() => break 'outer Ok(()),
                    c = source.connections.bus.consume(&queue, options.clone()) => c,
                };
                match attempt {
                    Ok(c) => c,
                    Err(BusError::Closed) => {
                        break 'outer Err(anyhow::anyhow!("the bus closed while consuming {queue}"))
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(%queue, error = %e, "cannot start consumer; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'outer Ok(()),
                            _ = tokio::time::sleep(HANDLER_BACKOFF.delay(failures)) => {}
                        }
                        continue;
                    }
                }
            }
        };
        let permit = tokio::select! {
            _ = shutdown.cancelled() => { consumer = Some(current); break 'outer Ok(()) }
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => { consumer = Some(current); break 'outer Ok(()) }
            },
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => { consumer = Some(current); break 'outer Ok(()) }
            n = current.next_envelope() => n,
        };
        match next {
            None => {
                // The consumer closed under us: start a new one, unless the
                // bus itself is gone (the next `consume` says so).
                drop(current);
                failures += 1;
                tracing::warn!(%queue, "consumer closed; restarting it");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer Ok(()),
                    _ = tokio::time::sleep(HANDLER_BACKOFF.delay(failures)) => {}
                }
            }
            Some(Err(e)) => {
                failures += 1;
                tracing::warn!(%queue, error = %e, "consume error");
                consumer = Some(current);
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer Ok(()),
                    _ = tokio::time::sleep(HANDLER_BACKOFF.delay(failures)) => {}
                }
            }
            Some(Ok((envelope, delivery))) => {
                failures = 0;
                consumer = Some(current);
                let state = state.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    handle_one(state, envelope, delivery, handler).await;
                });
            }
        }
    };
    tracker.close();
    tracker.wait().await;
    drop(consumer);
    result
}

async fn handle_one<S, H, Fut>(state: Arc<S>, envelope: Envelope, delivery: Delivery, handler: H)
where
    H: Fn(Arc<S>, Envelope) -> Fut,
    Fut: Future<Output = Settlement>,
{
    let span = tracing::info_span!(
        "handle",
        kind = envelope.kind(),
        plan_id = envelope.plan_id.as_deref().unwrap_or(""),
        path = envelope.task_id.as_deref().unwrap_or(""),
        attempt = envelope.attempt,
        delivery_attempt = delivery.attempt,
        queue = %delivery.queue,
    );
    devfleet_telemetry::set_parent(&span, envelope.traceparent.as_deref());
    async move {
        let settlement = handler(state, envelope).await;
        settle(delivery, settlement).await;
    }
    .instrument(span)
    .await
}

/// Settles a delivery; a failure to settle is logged (the broker redelivers
/// an unsettled message, so handlers must be idempotent).
pub async fn settle(delivery: Delivery, settlement: Settlement) {
    let queue = delivery.queue.clone();
    let attempt = delivery.attempt;
    let result = match settlement {
        Settlement::Ack => delivery.ack().await,
        Settlement::Retry(reason) => {
            tracing::warn!(%reason, attempt, "handler failed; retrying later");
            match delivery
                .retry(HANDLER_BACKOFF.delay(attempt), &reason)
                .await
            {
                Ok(RetryOutcome::DeadLettered) => {
                    tracing::error!(%reason, attempt, "gave up; message dead-lettered");
                    Ok(())
                }
                Ok(RetryOutcome::Scheduled) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Settlement::Delay(delay, reason) => {
            tracing::debug!(%reason, ?delay, "redelivering later");
            delivery.retry(delay, &reason).await.map(drop)
        }
        Settlement::DeadLetter(reason) => {
            tracing::error!(%reason, "dead-lettering message");
            delivery.dead_letter(&reason).await
        }
    };
    if let Err(e) = result {
        tracing::warn!(%queue, error = %e, "settling a delivery failed; it will be redelivered");
    }
}

/// Dead-letters a message of a kind this queue does not carry.
pub fn unexpected(envelope: &Envelope, queue: &str) -> Settlement {
    Settlement::DeadLetter(format!(
        "unexpected message kind '{}' on {queue}",
        envelope.kind()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_retry_ack_or_dead_letter() {
        assert!(matches!(
            Settlement::from_store_error("x", StoreError::Backend("down".into())),
            Settlement::Retry(_)
        ));
        assert_eq!(
            Settlement::from_store_error(
                "x",
                StoreError::InvalidState {
                    plan_id: "p".into(),
                    path: "a".into(),
                    state: devfleet_store::TaskState::Failed,
                    operation: "complete it",
                }
            ),
            Settlement::Ack
        );
        assert!(matches!(
            Settlement::from_store_error(
                "x",
                StoreError::UnknownTask {
                    plan_id: "p".into(),
                    path: "a".into()
                }
            ),
            Settlement::DeadLetter(_)
        ));
    }

    #[test]
    fn step_errors_settle_like_their_cause() {
        let publish = StepError::Publish(anyhow::anyhow!("no confirm"));
        assert_eq!(
            publish.settlement("publishing"),
            Settlement::Retry("publishing: no confirm".into())
        );
        let store: StepError = StoreError::Backend("down".into()).into();
        assert!(matches!(store.settlement("x"), Settlement::Retry(_)));
    }

    #[tokio::test]
    async fn loop_settles_each_envelope_and_stops_on_shutdown() {
        use devfleet_protocol::{queues, Message, TaskDone};
        let connections = Connections::in_memory().with_namespace("consume-test");
        for path in ["a", "b"] {
            let done = TaskDone {
                plan_id: "p".into(),
                path: path.into(),
                attempt: 1,
                artifact: String::new(),
            };
            connections.publish(queues::TASK_DONE, done).await.unwrap();
        }
        let (seen, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let shutdown = CancellationToken::new();
        let source = Source {
            connections: connections.clone(),
            queue: queues::TASK_DONE,
            options: ConsumeOptions::default(),
            concurrency: 2,
        };
        let running = tokio::spawn(consume(
            source,
            Arc::new(seen),
            shutdown.clone(),
            |seen: Arc<tokio::sync::mpsc::UnboundedSender<String>>, envelope: Envelope| async move {
                let Message::TaskDone(done) = envelope.message else {
                    return unexpected(&envelope, queues::TASK_DONE);
                };
                let _ = seen.send(done.path.clone());
                if done.path == "a" {
                    Settlement::Ack
                } else {
                    Settlement::DeadLetter("b is never done".into())
                }
            },
        ));
        let within = Duration::from_secs(10);
        let mut paths = Vec::new();
        for _ in 0..2 {
            let path = tokio::time::timeout(within, rx.recv()).await.unwrap();
            paths.extend(path);
        }
        paths.sort();
        assert_eq!(paths, ["a", "b"]);
        tokio::time::timeout(within, async {
            while connections.queue_depth(queues::TASK_DONE).await.unwrap() != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        shutdown.cancel();
        let stopped = tokio::time::timeout(within, running).await.unwrap();
        assert!(stopped.unwrap().is_ok());
    }
}
