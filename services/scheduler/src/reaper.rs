//! The lease reaper: returns tasks whose lease expired to Ready.
//!
//! A lease expires when its holder stopped renewing it: a dev-worker that
//! died mid-task, or a dispatched message no worker took in time. Reaped
//! tasks go back to the ready set with their class and priority and are
//! dispatched again; the dev-worker that may still hold the old message
//! finds the task taken (or takes it itself) when it claims, so the task
//! still completes once. Every replica may reap: the store step is atomic.

use crate::Shared;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Reaps every `reap_interval` until `shutdown`.
pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(shared.reap_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        match shared.connections.store.reap_expired().await {
            Ok(reaped) if reaped.is_empty() => {}
            Ok(reaped) => {
                for (plan_id, path) in &reaped {
                    tracing::warn!(%plan_id, %path, "lease expired; task is Ready again");
                }
                shared.wake.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "reaping expired leases failed"),
        }
    }
}
