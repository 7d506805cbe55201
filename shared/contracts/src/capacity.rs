//! The capacity protocol between dev-workers and the scheduler's dispatcher.
//!
//! Each dev-worker keeps one [`WorkerCapacity`] record in the store
//! collection [`WORKERS`], rewritten whenever its slots, busy
//! or waiting counts change and at least every third of its TTL; the
//! record expires with the TTL, so a worker killed with SIGKILL stops
//! counting within one TTL. The dispatcher reads the records
//! ([`read_fleet`]) and hands out work only while the work it has
//! dispatched that no worker has taken yet fits in the free slots
//! ([`credit`]).
//!
//! The dev-worker writes its record with [`write_capacity`]; the scheduler
//! reads the fleet with [`read_fleet`].

use devfleet_store::{StoreResult, TaskStore};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;

/// The lease owner the dispatcher claims tasks as. A dev-worker takes the
/// lease over with `claim(.., handoff_from = Some(DISPATCH_OWNER), ..)`.
pub const DISPATCH_OWNER: &str = "dispatch";

/// Store collection holding one capacity record per worker. (The store is
/// already per namespace: `devfleet:<namespace>` key prefix.)
pub const WORKERS: &str = "workers";

/// What one dev-worker can take, as of `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCapacity {
    /// Current concurrency limit (autoscaled).
    pub slots: u32,
    /// Tasks running now.
    pub busy: u32,
    /// Deliveries received and waiting for a slot (not yet claimed).
    pub waiting: u32,
    /// When the counts were taken (ms since the epoch).
    pub at_ms: i64,
    /// After this the record is ignored even if the store still returns it.
    pub expires_ms: i64,
    /// What this worker can run (see [`crate::capabilities`]): configured
    /// executors as `executor:KIND`, programs and Python modules found at
    /// start-up, operator labels. Sorted, no duplicates. Absent in
    /// records of older workers (read as none).
    #[serde(default)]
    pub capabilities: Vec<String>,
}

impl WorkerCapacity {
    /// Slots neither running nor promised to a waiting delivery.
    pub fn free(&self) -> u32 {
        self.slots
            .saturating_sub(self.busy.saturating_add(self.waiting))
    }
}

/// Writes (or refreshes) a worker's record with a TTL.
pub async fn write_capacity(
    store: &dyn TaskStore,
    instance: &str,
    capacity: &WorkerCapacity,
    ttl: Duration,
) -> StoreResult<()> {
    let json = serde_json::to_string(capacity).unwrap_or_default();
    store.kv_put(WORKERS, instance, &json, Some(ttl)).await
}

/// Removes a worker's record (on clean shutdown).
pub async fn remove_capacity(store: &dyn TaskStore, instance: &str) -> StoreResult<()> {
    store.kv_delete(WORKERS, instance).await.map(|_| ())
}

/// The live workers, summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    pub workers: u32,
    pub slots: u32,
    pub busy: u32,
    pub waiting: u32,
    pub free: u32,
    /// The newest `at_ms` among live records (`None` without workers).
    pub newest_at_ms: Option<i64>,
    /// Each live worker's capabilities.
    pub capabilities: Vec<BTreeSet<String>>,
}

impl Fleet {
    /// Sums records; expired or unreadable ones are skipped.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a str>, now_ms: i64) -> Fleet {
        let mut fleet = Fleet::default();
        for json in records {
            let Ok(c) = serde_json::from_str::<WorkerCapacity>(json) else {
                continue;
            };
            if c.expires_ms < now_ms {
                continue;
            }
            fleet.workers += 1;
            fleet.slots = fleet.slots.saturating_add(c.slots);
            fleet.busy = fleet.busy.saturating_add(c.busy);
            fleet.waiting = fleet.waiting.saturating_add(c.waiting);
            fleet.free = fleet.free.saturating_add(c.free());
            fleet.newest_at_ms = Some(fleet.newest_at_ms.map_or(c.at_ms, |n| n.max(c.at_ms)));
            fleet
                .capabilities
                .push(c.capabilities.into_iter().collect());
        }
        fleet
    }
}

/// Reads every live worker record.
pub async fn read_fleet(store: &dyn TaskStore, now_ms: i64) -> StoreResult<Fleet> {
    let records = store.kv_list(WORKERS).await?;
    Ok(Fleet::from_records(
        records.iter().map(|(_, v)| v.as_str()),
        now_ms,
    ))
}

/// How many more tasks the dispatcher may hand out now.
///
/// `outstanding` is the dispatched work no worker has reported yet: the
/// `work.dev` queue depth plus this scheduler's own dispatches newer than
/// the newest worker record (the scheduler's `dispatch::Ledger`). Without any live worker one
/// task may be outstanding, so a fresh stack starts (the first worker to
/// come up finds it waiting).
pub fn credit(fleet: &Fleet, outstanding: u64) -> u64 {
    let allowed = if fleet.workers == 0 {
        1
    } else {
        u64::from(fleet.free)
    };
    allowed.saturating_sub(outstanding)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(slots: u32, busy: u32, waiting: u32, at_ms: i64) -> String {
        serde_json::to_string(&WorkerCapacity {
            slots,
            busy,
            waiting,
            at_ms,
            expires_ms: at_ms + 1_000,
            capabilities: vec!["python3".into()],
        })
        .unwrap()
    }

    #[test]
    fn fleet_sums_live_records_and_skips_expired_and_garbage() {
        let a = rec(4, 1, 1, 100);
        let b = rec(2, 2, 0, 50);
        let old = rec(10, 0, 0, -5_000);
        let fleet = Fleet::from_records([a.as_str(), b.as_str(), old.as_str(), "{oops"], 120);
        assert_eq!(fleet.workers, 2);
        assert_eq!(fleet.slots, 6);
        assert_eq!(fleet.free, 2);
        assert_eq!(fleet.newest_at_ms, Some(100));
        assert_eq!(fleet.capabilities.len(), 2);
        assert!(fleet.capabilities[0].contains("python3"));
    }

    #[test]
    fn records_of_older_workers_read_as_without_capabilities() {
        let old = r#"{"slots":1,"busy":0,"waiting":0,"at_ms":0,"expires_ms":10}"#;
        let fleet = Fleet::from_records([old], 0);
        assert_eq!(fleet.workers, 1);
        assert!(fleet.capabilities[0].is_empty());
    }

    #[test]
    fn credit_is_free_slots_minus_outstanding() {
        let fleet = Fleet {
            workers: 2,
            free: 5,
            ..Fleet::default()
        };
        assert_eq!(credit(&fleet, 0), 5);
        assert_eq!(credit(&fleet, 3), 2);
        assert_eq!(credit(&fleet, 9), 0);
    }

    #[test]
    fn a_fleet_without_workers_gets_one_task_to_start() {
        assert_eq!(credit(&Fleet::default(), 0), 1);
        assert_eq!(credit(&Fleet::default(), 1), 0);
    }

    #[test]
    fn busy_workers_get_nothing_more() {
        let full = rec(2, 1, 1, 0);
        let fleet = Fleet::from_records([full.as_str()], 0);
        assert_eq!(credit(&fleet, 0), 0);
    }
}
