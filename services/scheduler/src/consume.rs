//! One consume loop for every queue the scheduler reads.
//!
//! Reads envelopes with a bounded number of handlers in flight, runs each
//! handler in a span linked to the publisher's trace, and settles the
//! delivery with what the handler returned: ack once the effect is durable,
//! retry with the shared backoff on a transient failure, dead-letter what
//! can never succeed. On shutdown it stops reading, lets in-flight handlers
//! finish (they are short store transitions), then closes the consumer, so
//! nothing is acked unfinished.

use crate::Shared;
use devfleet_bus::{BusError, ConsumeOptions, Delivery, RetryOutcome};
use devfleet_protocol::Envelope;
use devfleet_runtime::backoff::Backoff;
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
pub(crate) enum Settlement {
    /// The effect is durable (or there was nothing to do).
    Ack,
    /// A transient failure; redeliver after a backoff.
    Retry(String),
    /// It can never succeed; move it to the dead-letter queue.
    DeadLetter(String),
}

impl Settlement {
    /// Settlement for a store error: transient backend errors are retried,
    /// a transition that no longer applies means the message is stale
    /// (acked), and a message about nothing that exists is dead-lettered.
    pub(crate) fn from_store_error(what: &str, err: StoreError) -> Settlement {
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
}

/// Why a step of a handler did not finish: the store failed, or a message
/// could not be published (always transient: the broker confirms or not).
#[derive(Debug)]
pub(crate) enum StepError {
    Store(StoreError),
    Publish(anyhow::Error),
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        StepError::Store(e)
    }
}

impl StepError {
    /// The settlement of a delivery whose handler stopped at this error.
    pub(crate) fn settlement(self, what: &str) -> Settlement {
        match self {
            StepError::Store(e) => Settlement::from_store_error(what, e),
            StepError::Publish(e) => Settlement::Retry(format!("{what}: {e:#}")),
        }
    }
}

/// Retry policy for transient handler failures.
const HANDLER_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    factor: 2.0,
    cap: Duration::from_secs(30),
    jitter: 0.5,
};

/// Consumes the logical `queue` (namespace applied) until `shutdown`, running `handler` on each envelope
/// with at most `concurrency` in flight.
///
/// Returns an error only when the bus is closed for good while the loop was
/// meant to run on; broker outages are ridden out (the bus reconnects).
pub(crate) async fn consume<H, Fut>(
    shared: Arc<Shared>,
    queue: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
    handler: H,
) -> anyhow::Result<()>
where
    H: Fn(Arc<Shared>, Envelope) -> Fut + Send + Sync + Copy + 'static,
    Fut: Future<Output = Settlement> + Send + 'static,
{
    let concurrency = concurrency.max(1);
    let options = ConsumeOptions::default()
        .prefetch(u16::try_from(concurrency).unwrap_or(u16::MAX))
        .max_attempts(shared.max_handler_attempts);
    let queue = shared.connections.queue(queue);
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
                    c = shared.connections.bus.consume(&queue, options.clone()) => c,
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
                continue;
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
                let shared = shared.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    handle_one(shared, envelope, delivery, handler).await;
                });
            }
        }
    };
    tracker.close();
    tracker.wait().await;
    drop(consumer);
    result
}

async fn handle_one<H, Fut>(shared: Arc<Shared>, envelope: Envelope, delivery: Delivery, handler: H)
where
    H: Fn(Arc<Shared>, Envelope) -> Fut,
    Fut: Future<Output = Settlement>,
{
    let span = tracing::info_span!(
        "handle",
        kind = envelope.kind(),
        plan_id = envelope.plan_id.as_deref().unwrap_or(""),
        path = envelope.task_id.as_deref().unwrap_or(""),
        delivery_attempt = delivery.attempt,
        queue = %delivery.queue,
    );
    devfleet_telemetry::set_parent(&span, envelope.traceparent.as_deref());
    async move {
        let settlement = handler(shared, envelope).await;
        settle(delivery, settlement).await;
    }
    .instrument(span)
    .await
}

/// Settles a delivery; a failure to settle is logged (the broker redelivers
/// an unsettled message, and every handler is idempotent).
pub(crate) async fn settle(delivery: Delivery, settlement: Settlement) {
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
pub(crate) fn unexpected(envelope: &Envelope, queue: &str) -> Settlement {
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
}
