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
//!   nothing references: no task of any plan the store still holds, no
//!   base snapshot (manifest and files) of such a plan, and no cache
//!   entry still kept. A blob two plans share therefore lives as
//!   long as either does. The age check is repeated in the step that
//!   deletes the blob, so a writer that just stored the same bytes again
//!   keeps them.
//!
//! One narrow race remains: a dev-worker that read an expiring cache entry
//! at the instant it is collected may record a build whose blob is then
//! collected too; QA then finds the artifact missing and the task is built
//! again. Collecting is idempotent, and any number of replicas may run it.

use devfleet_store::{snapshot, StoreResult, TaskStore};
use serde::Serialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Collections whose keys start with `<plan_id>|`, deleted with the plan:
/// the scheduler's stage markers and watchdog records, and the router's
/// task history, pending retries and parked QA work.
pub const PLAN_KEYED: [&str; 6] = [
    crate::stages::PLAN_STAGES,
    crate::watchdog::WATCHDOG,
    "history",
    "retries",
    "qa_parked",
    // The dev-worker's record of workspace changes per task.
    devfleet_store::extra_files::WORKSPACE_CHANGES,
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
        if let Some(id) = base_snapshot(&plan.detail) {
            // The manifest and every file of it; a manifest already gone
            // (or unreadable) references nothing more.
            if let Ok(Some(manifest)) = snapshot::load(store, &id).await {
                referenced.extend(manifest.files.into_values().map(|f| f.blob));
            }
            referenced.insert(id);
        }
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

/// The base snapshot id in a plan record's detail (the analyzed plan).
fn base_snapshot(detail: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Detail {
        plan: PlanPart,
    }
    #[derive(serde::Deserialize)]
    struct PlanPart {
        #[serde(default)]
        base_snapshot: Option<String>,
    }
    serde_json::from_str::<Detail>(detail)
        .ok()
        .and_then(|d| d.plan.base_snapshot)
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

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::{now_ms, PlanStatus};
    use devfleet_store::memory::MemoryStore;
    use devfleet_store::{ClaimOutcome, Fence, NewTask, PlanRecord};

    /// A plan whose one task completed with the artifact holding `bytes`.
    async fn plan_with_artifact(store: &dyn TaskStore, id: &str, bytes: &[u8]) -> String {
        let task = NewTask::new("a.py", "s");
        let plan = PlanRecord::new(id, id, PlanStatus::Running, now_ms());
        assert!(store.create_plan(plan, vec![task]).await.unwrap());
        let hash = store.put_artifact(bytes).await.unwrap();
        let ClaimOutcome::Claimed(claimed) = store
            .claim(id, "a.py", "w", None, Duration::from_secs(30))
            .await
            .unwrap()
        else {
            panic!("the task is ready");
        };
        let fence = Fence::of(&claimed);
        store.mark_built(id, "a.py", &fence, &hash).await.unwrap();
        store.complete(id, "a.py", &fence, &hash).await.unwrap();
        hash
    }

    /// A cutoff after everything written so far.
    fn after_now() -> i64 {
        now_ms() + 1
    }

    #[tokio::test]
    async fn a_live_plans_base_snapshot_is_kept_and_collected_with_the_plan() {
        let store = MemoryStore::new();
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("lib.py"), "def f(): pass\n").unwrap();
        let built = snapshot::build(base.path(), snapshot::Limits::default()).unwrap();
        let id = built.store(&store).await.unwrap();
        let blob = built.manifest.files["lib.py"].blob.clone();
        let detail =
            serde_json::json!({ "plan": { "name": "p", "tasks": [], "base_snapshot": id } });
        let plan = PlanRecord {
            detail: detail.to_string(),
            ..PlanRecord::new("p", "p", PlanStatus::Running, now_ms())
        };
        assert!(store
            .create_plan(plan, vec![NewTask::new("a.py", "s")])
            .await
            .unwrap());
        let collected = collect(&store, after_now(), false).await.unwrap();
        assert_eq!(collected.artifacts, 0, "{collected:?}");
        assert!(
            store.artifact(&id).await.unwrap().is_some(),
            "manifest kept"
        );
        assert!(store.artifact(&blob).await.unwrap().is_some(), "file kept");

        store
            .set_plan_status("p", PlanStatus::Succeeded, None)
            .await
            .unwrap();
        let collected = collect(&store, after_now(), false).await.unwrap();
        assert_eq!(collected.plans, ["p"]);
        assert_eq!(collected.artifacts, 2, "manifest and file go with the plan");
        assert!(store.artifact(&id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_blob_two_plans_share_is_collected_only_when_neither_references_it() {
        shared_blob(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn redis_a_blob_two_plans_share_is_collected_only_when_neither_references_it() {
        let url = devfleet_testkit::redis_url();
        let store =
            devfleet_store::redis::RedisStore::connect(&url, &devfleet_testkit::unique("gc"))
                .await
                .unwrap();
        shared_blob(&store).await;
    }

    async fn shared_blob(store: &dyn TaskStore) {
        let shared = plan_with_artifact(store, "a", b"shared").await;
        assert_eq!(plan_with_artifact(store, "b", b"shared").await, shared);
        let own = store
            .put_artifact(b"only a's earlier attempt")
            .await
            .unwrap();
        store
            .set_plan_status("a", PlanStatus::Succeeded, None)
            .await
            .unwrap();
        for (collection, key) in [
            ("history", "a|a.py"),
            ("history", "b|a.py"),
            ("plan_stages", "a|integrating"),
        ] {
            store.kv_put(collection, key, "{}", None).await.unwrap();
        }
        let dead =
            |plan: &str| format!("{{\"id\":\"t-{plan}\",\"plan_id\":\"{plan}\",\"at_ms\":1}}");
        store
            .kv_put(DLQ_INDEX, "t-a", &dead("a"), None)
            .await
            .unwrap();
        store
            .kv_put(DLQ_INDEX, "t-b", &dead("b"), None)
            .await
            .unwrap();

        let planned = collect(store, after_now(), true).await.unwrap();
        assert_eq!(planned.plans, vec!["a".to_owned()]);
        assert_eq!(
            (planned.artifacts, planned.plan_records, planned.dlq_entries),
            (1, 2, 1)
        );
        assert!(
            store.plan("a").await.unwrap().is_some(),
            "a dry run deletes nothing"
        );

        // Plan b is still running: it, and the blob it shares, stay.
        let collected = collect(store, after_now(), false).await.unwrap();
        assert_eq!(
            (
                collected.plans.clone(),
                collected.artifacts,
                collected.plan_records,
                collected.dlq_entries
            ),
            (
                planned.plans.clone(),
                planned.artifacts,
                planned.plan_records,
                planned.dlq_entries
            ),
            "the dry run said what would go"
        );
        assert_eq!(store.plan("a").await.unwrap(), None);
        assert!(
            store.plan("b").await.unwrap().is_some(),
            "a running plan is never collected"
        );
        assert!(
            store.artifact(&shared).await.unwrap().is_some(),
            "b still references it"
        );
        assert_eq!(store.artifact(&own).await.unwrap(), None);
        assert_eq!(store.kv_get("history", "a|a.py").await.unwrap(), None);
        assert_eq!(
            store.kv_get("plan_stages", "a|integrating").await.unwrap(),
            None
        );
        assert!(store.kv_get("history", "b|a.py").await.unwrap().is_some());
        assert_eq!(store.kv_get(DLQ_INDEX, "t-a").await.unwrap(), None);
        assert!(
            store.kv_get(DLQ_INDEX, "t-b").await.unwrap().is_some(),
            "b is live: its dead letters may be replayed"
        );

        // Once b is finished and old enough too, the blob goes with it.
        store
            .set_plan_status("b", PlanStatus::Failed, None)
            .await
            .unwrap();
        let collected = collect(store, after_now(), false).await.unwrap();
        assert_eq!(
            (collected.plans, collected.artifacts, collected.dlq_entries),
            (vec!["b".to_owned()], 1, 1)
        );
        assert_eq!(store.artifact(&shared).await.unwrap(), None);
        assert!(store.plans().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_kept_cache_entry_keeps_its_blob_and_an_old_one_goes_with_it() {
        let store = MemoryStore::new();
        let old = store.put_artifact(b"cached").await.unwrap();
        store.cache_put("old-key", &old).await.unwrap();
        let cutoff = after_now();
        // The entry is rewritten after the cutoff (the clock moves on): it
        // is kept, and so is the blob it points to, though older.
        while now_ms() < cutoff {
            tokio::task::yield_now().await;
        }
        store.cache_put("old-key", &old).await.unwrap();
        let collected = collect(&store, cutoff, false).await.unwrap();
        assert_eq!((collected.cache_entries, collected.artifacts), (0, 0));
        assert!(store.artifact(&old).await.unwrap().is_some());
        // Later, both have expired.
        let collected = collect(&store, after_now(), false).await.unwrap();
        assert_eq!((collected.cache_entries, collected.artifacts), (1, 1));
        assert_eq!(store.cache_get("old-key").await.unwrap(), None);
        assert_eq!(store.artifact(&old).await.unwrap(), None);
    }
}
