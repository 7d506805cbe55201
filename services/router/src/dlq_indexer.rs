//! Moves bus dead letters into the store's DLQ index, so `devfleet dlq
//! list` shows them beside dead-lettered tasks.
//!
//! Each namespace has its own dead-letter queue on the broker
//! (`<namespace>.devfleet.dlq`, `devfleet.dlq` for the empty one; see
//! [`devfleet_bus::dead_letter_queue_for`]), and the router reads its own.
//! Should a letter of another namespace's queues turn up (letters left in
//! the shared `devfleet.dlq` by older versions are read by the empty
//! namespace only), it is handed back (unsettled, after a short hold so it
//! does not spin) for the router it belongs to.

use crate::dlq;
use crate::Router;
use devfleet_bus::{ConsumeOptions, DEAD_LETTER_QUEUE};
use devfleet_runtime::consume::{Consume, Inflight, RawDelivery, Settlement};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a foreign dead letter is held before it is handed back.
const FOREIGN_HOLD: Duration = Duration::from_secs(1);

/// Dead letters read ahead (handled one at a time).
const READ_AHEAD: u32 = 8;

/// Indexes bus dead letters until `stop`. On `stop` a dead letter being
/// held or indexed is handed back at once (indexing is idempotent).
pub(crate) async fn run(router: Arc<Router>, stop: CancellationToken) -> anyhow::Result<()> {
    Consume::new(router.connections.clone(), DEAD_LETTER_QUEUE)
        .options(ConsumeOptions::default())
        .concurrency(1)
        .read_ahead(READ_AHEAD)
        .grace(Duration::ZERO)
        .run_raw(router, stop, index)
        .await
}

/// Indexes one dead letter of this namespace; holds and hands back others.
async fn index(router: Arc<Router>, delivery: RawDelivery, _inflight: Inflight) -> Settlement {
    let namespace = &router.connections.namespace;
    let source = delivery
        .dead_letter
        .as_ref()
        .map(|i| i.queue.clone())
        .unwrap_or_default();
    if !dlq::owns_queue(namespace, &source) {
        tokio::time::sleep(FOREIGN_HOLD).await;
        return Settlement::HandBack(format!("a dead letter of another namespace ({source})"));
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
            Settlement::Ack
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot index a dead letter; handing it back");
            tokio::time::sleep(FOREIGN_HOLD).await;
            Settlement::HandBack(format!("indexing failed: {e}"))
        }
    }
}
