//! One consume loop for every queue the router reads.
//!
//! Reads envelopes with a bounded number of handlers in flight, runs each
//! handler in a span linked to the publisher's trace, and settles the
//! delivery with what the handler returned: ack once the effect is durable,
//! retry with backoff on a transient failure, redeliver after a chosen
//! delay (the retry queue), dead-letter what can never succeed. On shutdown
//! it stops reading, lets in-flight handlers finish (short store and bus
//! steps), then closes the consumer, so nothing is acked unfinished.

use devfleet_bus::{BusError, ConsumeOptions, Delivery, RetryOutcome};
use devfleet_protocol::Envelope;
use devfleet_runtime::{backoff::Backoff, Connections};
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

    /// Settlement for a failed publish: retried.
    pub(crate) fn from_publish_error(what: &str, err: anyhow::Error) -> Settlement {
        Settlement::Retry(format!("{what}: {err:#}"))
    }
}

/// Retry policy for transient handler failures.
const HANDLER_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    factor: 2.0,
    cap: Duration::from_secs(30),
    jitter: 0.5,
};

/// Where a consume loop reads and how.
pub(crate) struct Source {
    pub connections: Connections,
    /// Logical queue (namespace applied by [`Connections`]).
    pub queue: &'static str,
    pub options: ConsumeOptions,
    pub concurrency: usize,
}

/// Consumes a queue until `shutdown`, running `handler` on each envelope.
///
/// Returns an error only when the bus is closed for good while the loop was
/// meant to run on; broker outages are ridden out (the bus reconnects).
pub(crate) async fn consume<S, H, Fut>(
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
                drop(current);
                failures += 1;
                tracing::warn!(%queue, "consumer closed; restarting it");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer Ok(()),
                    _ = tokio::time::sleep(HANDLER_BACKOFF.delay(failures)) => {}
                }
            }
            Some(Err(e)) => {
                tracing::warn!(%queue, error = %e, "consume error");
                consumer = Some(current);
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
pub(crate) fn unexpected(envelope: &Envelope, queue: &str) -> Settlement {
    Settlement::DeadLetter(format!(
        "unexpected message kind '{}' on {queue}",
        envelope.kind()
    ))
}
