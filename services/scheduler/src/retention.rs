//! Retention: what the store keeps of finished work, and for how long.
//!
//! [`collect`] (run by every scheduler every
//! `DEVFLEET_SCHEDULER_RETENTION_INTERVAL_SECONDS`, and by hand with
//! `devfleet gc`) removes what is older than a cutoff:
//!
//! * **finished plans** (Succeeded, Failed, Rejected) last updated before
//!   it, with their tasks and every record keyed by the plan: stage
//!   markers, integration results, the watchdog's announcements and the
//!   router's per-task history, retry and parked-QA records
//!   ([`PLAN_KEYED`]). A plan that is still live is never collected (the
//!   store re-checks its status in the same atomic step that deletes it);
//! * **DLQ index entries** dead-lettered before it, unless their plan is
//!   still live (a live plan's dead letters may still be replayed);
//! * **result-cache entries** last written before it;
//! * **artifacts** (content-addressed blobs) last stored before it that
//!   nothing references: no task of any plan the store still holds and no
//!   cache entry still kept. A blob two plans share therefore lives as
//!   long as either does. The age check is repeated in the step that
//!   deletes the blob, so a writer that just stored the same bytes again
//!   keeps them.
//!
//! One narrow race remains: a dev-worker that read an expiring cache entry
//! at the instant it is collected may record a build whose blob is then
//! collected too; QA then finds the artifact missing and the task is built
//! again. Collecting is idempotent, and any number of replicas may run it.

use devfleet_store::{StoreResult, TaskStore};
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Collections whose keys start with `<plan_id>|`, deleted with the plan:
/// the scheduler's stage markers and watchdog records, and the router's
/// task history, pending retries and parked QA work.
pub const PLAN_KEYED: [&str; 5] = [
    crate::stages::PLAN_STAGES,
    crate::watchdog::WATCHDOG,
    "history",
    "retries",
    "qa_parked",
];
/// The router's DLQ index (entries are JSON with `plan_id` and `at_ms`).
pub const DLQ_INDEX: &str = "dlq";

/// What [`collect`] removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Collected {
    pub dry_run: bool,
    /// Everything older than this (ms since the epoch) was eligible.
    pub cutoff_ms: i64,
    /// Finished plans removed, with their tasks.
    pub plans: Vec<String>,
    /// Records keyed by those plans (markers, results, history…).
    pub plan_records: usize,
    pub dlq_entries: usize,
    pub cache_entries: usize,
    pub artifacts: usize,
}

/// Collects (see the module docs) everything older than `cutoff_ms`;
/// with `dry_run`, only reports what it would collect.
pub async fn collect(
    store: &dyn TaskStore,
    cutoff_ms: i64,
    dry_run: bool,
) -> StoreResult<Collected> {
    let mut out = Collected {
        dry_run,
        cutoff_ms,
        ..Collected::default()
    };
    let expired: Vec<String> = store
        .plans()
        .await?
        .into_iter()
        .filter(|p| p.status.is_final() && p.updated_ms < cutoff_ms)
        .map(|p| p.id)
        .collect();
    for id in expired {
        if dry_run || store.delete_plan(&id, cutoff_ms).await? {
            out.plans.push(id);
        }
    }
    let gone: HashSet<&str> = out.plans.iter().map(String::as_str).collect();
    out.plan_records = plan_records(store, &gone, dry_run).await?;

    // What is left decides what is still referenced (and live).
    let plans = store.plans().await?;
    let live: HashSet<&str> = plans
        .iter()
        .filter(|p| !p.status.is_final())
        .map(|p| p.id.as_str())
        .collect();
    out.dlq_entries = dlq_entries(store, cutoff_ms, &live, dry_run).await?;

    let mut referenced = HashSet::new();
    for entry in store.cache_entries().await? {
        if entry.written_ms < cutoff_ms
            && (dry_run || store.cache_delete(&entry.key, cutoff_ms).await?)
        {
            out.cache_entries += 1;
            continue;
        }
        referenced.insert(entry.artifact);
    }
    for plan in plans.iter().filter(|p| !gone.contains(p.id.as_str())) {
        // A plan deleted since it was listed references nothing.
        let tasks = match store.tasks(&plan.id).await {
            Ok(tasks) => tasks,
            Err(devfleet_store::StoreError::UnknownPlan { .. }) => continue,
            Err(e) => return Err(e),
        };
        referenced.extend(tasks.into_iter().filter_map(|t| t.artifact));
    }
    for (hash, written_ms) in store.artifact_hashes().await? {
        if written_ms >= cutoff_ms || referenced.contains(&hash) {
            continue;
        }
        if dry_run || store.delete_artifact(&hash, cutoff_ms).await? {
            out.artifacts += 1;
        }
    }
    Ok(out)
}

/// Records keyed by the collected plans: [`PLAN_KEYED`] and each plan's
/// integration results.
async fn plan_records(
    store: &dyn TaskStore,
    gone: &HashSet<&str>,
    dry_run: bool,
) -> StoreResult<usize> {
    let mut n = 0;
    if gone.is_empty() {
        return Ok(0);
    }
    for collection in PLAN_KEYED {
        for (key, value) in store.kv_list(collection).await? {
            let plan = key.split_once('|').map_or(key.as_str(), |(p, _)| p);
            if gone.contains(plan)
                && (dry_run || store.kv_delete_if(collection, &key, &value).await?)
            {
                n += 1;
            }
        }
    }
    for plan in gone {
        let collection = crate::integration::results_collection(plan);
        for (key, value) in store.kv_list(&collection).await? {
            if dry_run || store.kv_delete_if(&collection, &key, &value).await? {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// DLQ index entries dead-lettered before the cutoff whose plan (if any)
/// is not live. An unreadable entry is kept (`devfleet dlq` shows it).
async fn dlq_entries(
    store: &dyn TaskStore,
    cutoff_ms: i64,
    live: &HashSet<&str>,
    dry_run: bool,
) -> StoreResult<usize> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        plan_id: Option<String>,
        at_ms: i64,
    }
    let mut n = 0;
    for (key, json) in store.kv_list(DLQ_INDEX).await? {
        let Ok(entry) = serde_json::from_str::<Entry>(&json) else {
            continue;
        };
        let plan_live = entry.plan_id.as_deref().is_some_and(|p| live.contains(p));
        if entry.at_ms < cutoff_ms
            && !plan_live
            && (dry_run || store.kv_delete_if(DLQ_INDEX, &key, &json).await?)
        {
            n += 1;
        }
    }
    Ok(n)
}

/// Collects everything older than `keep` every `interval` until
/// `shutdown`. Failures are logged and tried again next time.
pub(crate) async fn run(
    store: Arc<dyn TaskStore>,
    keep: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let cutoff = devfleet_protocol::now_ms().saturating_sub(keep.as_millis() as i64);
        match collect(store.as_ref(), cutoff, false).await {
            Ok(c) => {
                if c.plans.len() + c.dlq_entries + c.cache_entries + c.artifacts > 0 {
                    tracing::info!(
                        plans = c.plans.len(),
                        plan_records = c.plan_records,
                        dlq_entries = c.dlq_entries,
                        cache_entries = c.cache_entries,
                        artifacts = c.artifacts,
                        "retention: collected what finished before the retention period"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention failed; trying again next time"),
        }
    }
}
