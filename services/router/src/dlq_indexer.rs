//! Moves bus dead letters (`devfleet.dlq`) into the store's DLQ index, so
//! `devfleet dlq list` shows them beside dead-lettered tasks.
//!
//! The broker's dead-letter queue is shared by every namespace on it. A
//! router of the empty namespace indexes every dead letter; a namespaced
//! one indexes those dead-lettered from its own queues (`<namespace>.…`)
//! and hands any other back (unsettled, after a short hold so it does not
//! spin) for the router, or test, it belongs to.

use crate::dlq;
use crate::Router;
use devfleet_bus::{BusError, ConsumeOptions, DEAD_LETTER_QUEUE};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a foreign dead letter is held before it is handed back.
const FOREIGN_HOLD: Duration = Duration::from_secs(1);

/// Indexes bus dead letters until `stop`.
pub(crate) async fn run(router: Arc<Router>, stop: CancellationToken) -> anyhow::Result<()> {
    let namespace = router.connections.namespace.clone();
    let options = ConsumeOptions::default().prefetch(8);
    let mut failures = 0u32;
    let backoff = devfleet_runtime::backoff::Backoff::default();
    loop {
        let consumer = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            c = router.connections.bus.consume(DEAD_LETTER_QUEUE, options.clone()) => c,
        };
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(BusError::Closed) => {
                anyhow::bail!("the bus closed while consuming {DEAD_LETTER_QUEUE}")
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "cannot consume the dead-letter queue; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff.delay(failures)) => {}
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                n = consumer.next() => n,
            };
            let delivery = match next {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the dead-letter queue failed");
                    continue;
                }
                Some(Ok(d)) => d,
            };
            failures = 0;
            let source = delivery
                .dead_letter
                .as_ref()
                .map(|i| i.queue.clone())
                .unwrap_or_default();
            if !dlq::owns_queue(&namespace, &source) {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(FOREIGN_HOLD) => {}
                }
                drop(delivery);
                continue;
            }
            let entry = dlq::message_entry(&delivery.payload, delivery.dead_letter.as_ref());
            match dlq::put(router.connections.store.as_ref(), &entry).await {
                Ok(()) => {
                    tracing::warn!(
                        dlq_id = %entry.id,
                        queue = %source,
                        kind = entry.kind.as_deref().unwrap_or("undecodable"),
                        reason = %entry.reason,
                        "bus dead letter indexed"
                    );
                    if let Err(e) = delivery.ack().await {
                        tracing::warn!(error = %e, "acking an indexed dead letter failed; it will be indexed again");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot index a dead letter; handing it back");
                    tokio::time::sleep(FOREIGN_HOLD).await;
                    drop(delivery);
                }
            }
        }
        tracing::warn!("dead-letter consumer closed; restarting it");
    }
}
