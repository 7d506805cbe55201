//! The capacity heartbeat: this worker's slots, busy and waiting counts in
//! the store, for the scheduler's dispatch credit.
//!
//! Written whenever the counts change (coalesced to at most one write per
//! [`MIN_GAP`]) and at least every third of the TTL, so the record is
//! current within milliseconds while work flows and vanishes within one TTL
//! of the worker dying. A draining worker advertises no free slot; on a
//! clean exit the record is deleted.

use crate::Worker;
use devfleet_contracts::capacity::{self, WorkerCapacity};
use devfleet_protocol::now_ms;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Least time between two writes.
pub const MIN_GAP: Duration = Duration::from_millis(5);

/// Writes the record until `stop`, then deletes it.
pub(crate) async fn run(worker: Arc<Worker>, stop: CancellationToken) {
    let ttl = worker.heartbeat_ttl;
    let refresh = ttl / 3;
    let mut last: Option<(u32, u32, u32)> = None;
    loop {
        let record = worker.capacity_now(now_ms());
        let counts = (record.slots, record.busy, record.waiting);
        if let Err(e) = write(&worker, &record, ttl).await {
            tracing::warn!(error = %e, "cannot write the capacity heartbeat");
        } else if last != Some(counts) {
            tracing::trace!(?counts, "capacity");
            last = Some(counts);
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = worker.capacity_changed.notified() => {}
            _ = tokio::time::sleep(refresh) => {}
        }
        tokio::time::sleep(MIN_GAP).await;
    }
    if let Err(e) =
        capacity::remove_capacity(worker.connections.store.as_ref(), &worker.instance).await
    {
        tracing::debug!(error = %e, "cannot remove the capacity heartbeat; it expires");
    }
}

async fn write(
    worker: &Worker,
    record: &WorkerCapacity,
    ttl: Duration,
) -> devfleet_store::StoreResult<()> {
    capacity::write_capacity(
        worker.connections.store.as_ref(),
        &worker.instance,
        record,
        ttl,
    )
    .await
}
