//! The store conformance suite: one set of behaviours, run against every
//! backend. `store_suite!` generates the same `#[tokio::test]`s for the
//! in-memory store and for Redis (at `DEVFLEET_REDIS_URL`, each test under
//! its own key prefix), so the embedded mode's store cannot silently differ
//! from the real one.
//!
//! Redis-only tests follow the suite; the one that restarts Redis has
//! `restart` in its name so `scripts/test.sh` runs it alone.

use devfleet_protocol::{PlanStatus, TaskClass, Usage};
use devfleet_store::memory::MemoryStore;
use devfleet_store::redis::RedisStore;
use devfleet_store::{
    content_hash, BudgetLimits, BudgetState, ClaimOutcome, Fence, NewTask, PlanRecord, Reservation,
    SharedStore, Spend, StoreError, TaskRecord, TaskState, UsageTotals,
};
use devfleet_testkit::{redis_url, require_env, unique, wait_for, within};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(60);
const LEASE_MS: i64 = 60_000;

/// Moves a store's own clock (lease times come from it, never from the
/// caller's).
#[derive(Clone)]
enum Clock {
    Memory(Arc<MemoryStore>),
    Redis(Arc<RedisStore>),
}

impl Clock {
    async fn advance(&self, by: Duration) {
        match self {
            Clock::Memory(m) => m.advance_clock(by),
            Clock::Redis(r) => r.advance_clock(by).await.unwrap(),
        }
    }
}

async fn memory_store() -> (SharedStore, Clock) {
    let m = Arc::new(MemoryStore::new());
    (m.clone(), Clock::Memory(m))
}

async fn redis_store() -> (SharedStore, Clock) {
    let r = Arc::new(connect_redis(&unique("t")).await);
    (r.clone(), Clock::Redis(r))
}

/// The fence of the task's current claim (its lease holder, if any): what
/// its rightful writer carries.
async fn fence(store: &SharedStore, plan_id: &str, path: &str) -> Fence {
    match store.task(plan_id, path).await {
        Ok(Some(t)) => Fence::of(&t),
        _ => Fence::attempt(0),
    }
}

/// Asserts a write was refused as stale and returns the task as it is.
fn assert_stale<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    match r {
        Err(StoreError::StaleClaim { .. }) => {}
        other => panic!("{what}: expected StaleClaim, got {other:?}"),
    }
}

fn lease_len(t: &TaskRecord) -> i64 {
    t.lease_expires_ms.unwrap_or_default() - t.updated_ms
}

async fn connect_redis(prefix: &str) -> RedisStore {
    let url = redis_url();
    match RedisStore::connect(&url, prefix).await {
        Ok(s) => s,
        Err(e) => panic!("connecting to Redis at {url}: {e}"),
    }
}

fn plan(id: &str, created_ms: i64) -> PlanRecord {
    PlanRecord {
        detail: "{\"opaque\":true}".into(),
        ..PlanRecord::new(id, format!("name of {id}"), PlanStatus::Running, created_ms)
    }
}

fn task(path: &str, deps: &[&str], priority: u32) -> NewTask {
    NewTask {
        path: path.to_owned(),
        spec: format!("write {path}"),
        content: None,
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        priority,
        estimate: 1,
        executor: None,
    }
}

async fn create(store: &SharedStore, tasks: Vec<NewTask>) -> String {
    create_at(store, tasks, 1).await
}

async fn create_at(store: &SharedStore, tasks: Vec<NewTask>, created_ms: i64) -> String {
    let id = unique("plan");
    assert!(store
        .create_plan(plan(&id, created_ms), tasks)
        .await
        .unwrap());
    id
}

async fn state(store: &SharedStore, plan_id: &str, path: &str) -> TaskState {
    store
        .task(plan_id, path)
        .await
        .unwrap()
        .expect("task exists")
        .state
}

/// Claims every ready task in order, returning `(plan, path)` pairs.
async fn drain(store: &SharedStore, owner: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(t) = store.claim_next(owner, LEASE).await.unwrap() {
        out.push((t.plan_id, t.path));
    }
    out
}

/// Leases a task by name and returns the claimed record's attempt.
async fn claim_ok(store: &SharedStore, plan_id: &str, path: &str, owner: &str) -> u32 {
    match store
        .claim(plan_id, path, owner, None, LEASE)
        .await
        .unwrap()
    {
        ClaimOutcome::Claimed(t) => {
            assert_eq!(t.lease_owner.as_deref(), Some(owner));
            t.attempt
        }
        other => panic!("claiming {path} as {owner}: {other:?}"),
    }
}

mod checks {
    use super::*;

    pub async fn ready_order_is_fix_first_then_priority_then_fifo_across_plans(
        s: SharedStore,
        _clock: Clock,
    ) {
        let a = create_at(
            &s,
            vec![task("a1", &[], 1), task("a2", &[], 5), task("a3", &[], 1)],
            1,
        )
        .await;
        let b = create_at(&s, vec![task("b1", &[], 5), task("b2", &[], 1)], 2).await;
        assert_eq!(s.ready_len().await.unwrap(), 5);
        // A low-priority task sent back as a fix jumps ahead of everything.
        assert_eq!(claim_ok(&s, &a, "a3", "w").await, 1);
        s.requeue(
            &a,
            "a3",
            &fence(&s, &a, "a3").await,
            TaskClass::Fix,
            Some("tests failed".into()),
        )
        .await
        .unwrap();
        let order = drain(&s, "w").await;
        let p = |plan: &str, path: &str| (plan.to_owned(), path.to_owned());
        assert_eq!(
            order,
            vec![
                p(&a, "a3"),
                p(&a, "a2"),
                p(&b, "b1"),
                p(&a, "a1"),
                p(&b, "b2")
            ]
        );
        let fixed = s.task(&a, "a3").await.unwrap().unwrap();
        assert_eq!(fixed.class, TaskClass::Fix);
        assert_eq!(fixed.attempt, 2, "the requeue started a new attempt");
        assert_eq!(fixed.error.as_deref(), Some("tests failed"));
        assert_eq!(s.ready_len().await.unwrap(), 0);
        assert!(s.claim_next("w", LEASE).await.unwrap().is_none());
    }

    pub async fn a_task_becomes_ready_exactly_when_its_last_dependency_completes(
        s: SharedStore,
        _clock: Clock,
    ) {
        let p = create(
            &s,
            vec![
                task("a", &[], 0),
                task("b", &["a"], 0),
                task("c", &["a"], 0),
                task("d", &["b", "c"], 0),
            ],
        )
        .await;
        assert_eq!(s.ready_len().await.unwrap(), 1);
        assert_eq!(state(&s, &p, "d").await, TaskState::Pending);
        claim_ok(&s, &p, "a", "w").await;
        let done = s
            .complete(&p, "a", &fence(&s, &p, "a").await, "h-a")
            .await
            .unwrap();
        assert!(done.newly_done);
        assert_eq!(done.released, vec!["b", "c"]);
        assert_eq!((done.done, done.total, done.plan_finished), (1, 4, false));
        assert_eq!(state(&s, &p, "d").await, TaskState::Pending);

        claim_ok(&s, &p, "b", "w").await;
        s.mark_built(&p, "b", &fence(&s, &p, "b").await, "h-b")
            .await
            .unwrap();
        let done = s
            .complete(&p, "b", &fence(&s, &p, "b").await, "h-b")
            .await
            .unwrap();
        assert!(done.released.is_empty(), "d still waits for c");
        assert_eq!(state(&s, &p, "d").await, TaskState::Pending);

        claim_ok(&s, &p, "c", "w").await;
        let done = s
            .complete(&p, "c", &fence(&s, &p, "c").await, "h-c")
            .await
            .unwrap();
        assert_eq!(done.released, vec!["d"]);
        assert_eq!(state(&s, &p, "d").await, TaskState::Ready);

        claim_ok(&s, &p, "d", "w").await;
        let done = s
            .complete(&p, "d", &fence(&s, &p, "d").await, "h-d")
            .await
            .unwrap();
        assert_eq!((done.done, done.total, done.plan_finished), (4, 4, true));
        let plan = s.plan(&p).await.unwrap().unwrap();
        assert_eq!(
            (plan.done, plan.total, plan.failed, plan.blocked),
            (4, 4, 0, 0)
        );
        let d = s.task(&p, "d").await.unwrap().unwrap();
        assert_eq!(d.artifact.as_deref(), Some("h-d"));
        assert_eq!(d.lease_owner, None);
    }

    pub async fn duplicate_completion_is_a_no_op(s: SharedStore, _clock: Clock) {
        let p = create(&s, vec![task("a", &[], 0), task("b", &["a"], 0)]).await;
        claim_ok(&s, &p, "a", "w").await;
        let first = s
            .complete(&p, "a", &fence(&s, &p, "a").await, "h1")
            .await
            .unwrap();
        assert_eq!(first.released, vec!["b"]);
        let again = s
            .complete(&p, "a", &fence(&s, &p, "a").await, "h2")
            .await
            .unwrap();
        assert!(!again.newly_done);
        assert!(again.released.is_empty());
        assert_eq!(
            (again.done, again.total, again.plan_finished),
            (1, 2, false)
        );
        assert_eq!(
            s.ready_len().await.unwrap(),
            1,
            "b is in the ready set once"
        );
        let a = s.task(&p, "a").await.unwrap().unwrap();
        assert_eq!(
            a.artifact.as_deref(),
            Some("h1"),
            "the duplicate changed nothing"
        );
        assert_eq!(s.plan(&p).await.unwrap().unwrap().done, 1);
    }

    pub async fn concurrent_claims_hand_each_task_out_exactly_once(s: SharedStore, _clock: Clock) {
        let tasks = (0..50)
            .map(|i| task(&format!("f{i:02}.py"), &[], i % 7))
            .collect();
        let p = create(&s, tasks).await;
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..8 {
            let s = s.clone();
            workers.spawn(async move {
                let mut mine = Vec::new();
                while let Some(t) = s.claim_next(&format!("w{w}"), LEASE).await.unwrap() {
                    assert_eq!(t.lease_owner, Some(format!("w{w}")));
                    assert_eq!(t.attempt, 1);
                    mine.push(t.path);
                    tokio::task::yield_now().await;
                }
                mine
            });
        }
        let all: Vec<String> = within("8 workers drain 50 tasks", Duration::from_secs(60), async {
            let mut all = Vec::new();
            while let Some(r) = workers.join_next().await {
                all.extend(r.unwrap());
            }
            all
        })
        .await;
        let unique_paths: HashSet<&String> = all.iter().collect();
        assert_eq!(all.len(), 50, "claimed {all:?}");
        assert_eq!(unique_paths.len(), 50);
        assert_eq!(s.ready_len().await.unwrap(), 0);
        for t in s.tasks(&p).await.unwrap() {
            assert_eq!(t.state, TaskState::Leased);
        }
    }

    pub async fn expired_lease_makes_task_claimable_again(s: SharedStore, clock: Clock) {
        let p = create(&s, vec![task("a", &[], 0)]).await;
        let t = s.claim_next("w1", LEASE).await.unwrap().unwrap();
        assert_eq!((t.attempt, lease_len(&t)), (1, LEASE_MS));
        let expires = t.lease_expires_ms.unwrap();
        clock.advance(LEASE / 2).await;
        assert!(
            s.reap_expired().await.unwrap().is_empty(),
            "not expired half-way"
        );
        assert_eq!(
            s.claim(&p, "a", "w2", None, LEASE).await.unwrap(),
            ClaimOutcome::Held {
                owner: "w1".into(),
                expires_ms: expires
            }
        );
        clock.advance(LEASE).await;
        assert_eq!(
            s.reap_expired().await.unwrap(),
            vec![(p.clone(), "a".to_owned())]
        );
        let reaped = s.task(&p, "a").await.unwrap().unwrap();
        assert_eq!(reaped.state, TaskState::Ready);
        assert_eq!(reaped.class, TaskClass::New, "class kept");
        assert_eq!(reaped.lease_owner, None);
        assert!(
            !s.renew(&p, "a", &Fence::holder("w1", 1), LEASE)
                .await
                .unwrap(),
            "w1 lost it"
        );
        let t = s.claim_next("w2", LEASE).await.unwrap().unwrap();
        assert_eq!((t.attempt, t.lease_owner.as_deref()), (2, Some("w2")));
        // Without a reaper: another owner takes an expired lease directly.
        clock.advance(LEASE * 2).await;
        assert_eq!(claim_ok(&s, &p, "a", "w3").await, 3);
        assert!(!s
            .renew(&p, "a", &Fence::holder("w2", 2), LEASE)
            .await
            .unwrap());
        assert!(
            s.reap_expired().await.unwrap().is_empty(),
            "w3's lease is live"
        );
    }

    pub async fn lease_times_come_from_the_store_clock(s: SharedStore, clock: Clock) {
        create(&s, vec![task("a", &[], 0)]).await;
        // The store's clock runs an hour ahead of this host's: leases
        // follow the store, not the caller.
        clock.advance(Duration::from_secs(3600)).await;
        let host_now = devfleet_protocol::now_ms();
        let t = s.claim_next("w1", LEASE).await.unwrap().unwrap();
        assert_eq!(lease_len(&t), LEASE_MS);
        assert!(
            t.lease_expires_ms.unwrap() >= host_now + 3_600_000 + LEASE_MS,
            "expiry {:?} is by the store's clock (host now {host_now})",
            t.lease_expires_ms
        );
    }

    pub async fn renew_extends_for_the_owner_and_fails_for_a_stranger(
        s: SharedStore,
        clock: Clock,
    ) {
        let p = create(&s, vec![task("a", &[], 0)]).await;
        claim_ok(&s, &p, "a", "w1").await;
        let before = s.task(&p, "a").await.unwrap().unwrap();
        let f = Fence::holder("w1", 1);
        clock.advance(LEASE / 2).await;
        assert!(s.renew(&p, "a", &f, LEASE).await.unwrap());
        let t = s.task(&p, "a").await.unwrap().unwrap();
        assert_eq!(lease_len(&t), LEASE_MS);
        assert!(t.lease_expires_ms > before.lease_expires_ms);
        assert_eq!(t.attempt, 1, "renewing is not a new attempt");
        assert!(!s
            .renew(&p, "a", &Fence::holder("stranger", 1), LEASE)
            .await
            .unwrap());
        assert!(
            !s.renew(&p, "a", &Fence::holder("w1", 2), LEASE)
                .await
                .unwrap(),
            "another attempt's fence"
        );
        assert!(
            !s.renew(&p, "a", &Fence::attempt(1), LEASE).await.unwrap(),
            "no holder named"
        );
        clock.advance(LEASE * 3 / 4).await;
        assert!(
            s.reap_expired().await.unwrap().is_empty(),
            "the renewal holds"
        );
        clock.advance(LEASE).await;
        assert!(!s.renew(&p, "a", &f, LEASE).await.unwrap(), "expired: lost");
        assert!(matches!(
            s.renew(&p, "nope", &f, LEASE).await,
            Err(StoreError::UnknownTask { .. })
        ));
    }

    pub async fn handoff_passes_the_lease_without_a_new_attempt(s: SharedStore, _clock: Clock) {
        let p = create(&s, vec![task("a", &[], 0), task("b", &["a"], 0)]).await;
        let t = s.claim_next("scheduler", LEASE).await.unwrap().unwrap();
        assert_eq!(t.attempt, 1);
        let expires = match s
            .claim(&p, "a", "worker-1", Some("scheduler"), LEASE)
            .await
            .unwrap()
        {
            ClaimOutcome::Claimed(t) => {
                assert_eq!(t.lease_owner.as_deref(), Some("worker-1"));
                assert_eq!(t.attempt, 1);
                assert_eq!(lease_len(&t), LEASE_MS);
                t.lease_expires_ms.unwrap()
            }
            other => panic!("handoff: {other:?}"),
        };
        // The dispatcher no longer holds it, so a second handoff finds it held.
        assert_eq!(
            s.claim(&p, "a", "worker-2", Some("scheduler"), LEASE)
                .await
                .unwrap(),
            ClaimOutcome::Held {
                owner: "worker-1".into(),
                expires_ms: expires
            }
        );
        // A redelivered claim by the same worker keeps the attempt.
        assert_eq!(claim_ok(&s, &p, "a", "worker-1").await, 1);
        assert!(!s
            .renew(&p, "a", &Fence::holder("scheduler", 1), LEASE)
            .await
            .unwrap());
        assert_eq!(
            s.claim(&p, "b", "worker-1", None, LEASE).await.unwrap(),
            ClaimOutcome::NotClaimable(TaskState::Pending)
        );
        assert!(matches!(
            s.claim(&p, "zz", "worker-1", None, LEASE).await,
            Err(StoreError::UnknownTask { .. })
        ));
    }

    pub async fn a_worker_paused_past_its_lease_cannot_overwrite_its_successor(
        s: SharedStore,
        clock: Clock,
    ) {
        let p = create(&s, vec![task("a", &[], 0), task("b", &[], 0)]).await;
        let old = match s.claim(&p, "a", "w1", None, LEASE).await.unwrap() {
            ClaimOutcome::Claimed(t) => Fence::of(&t),
            other => panic!("{other:?}"),
        };
        assert_eq!(old, Fence::holder("w1", 1));
        // w1 is paused past its lease; w2 takes the task over.
        clock.advance(LEASE * 2).await;
        let new = match s.claim(&p, "a", "w2", None, LEASE).await.unwrap() {
            ClaimOutcome::Claimed(t) => Fence::of(&t),
            other => panic!("{other:?}"),
        };
        assert_eq!(new, Fence::holder("w2", 2));
        // w1 resumes: none of its writes land.
        assert!(!s.renew(&p, "a", &old, LEASE).await.unwrap());
        match s.mark_built(&p, "a", &old, "h-old").await {
            Err(StoreError::StaleClaim {
                attempt: 1,
                current_attempt: 2,
                current_owner: Some(o),
                state: TaskState::Leased,
                ..
            }) if o == "w2" => {}
            other => panic!("expected StaleClaim naming w2's attempt 2, got {other:?}"),
        }
        assert_stale(
            s.requeue(&p, "a", &old, TaskClass::Fix, Some("x".into()))
                .await,
            "requeue by the old holder",
        );
        assert_stale(
            s.complete(&p, "a", &Fence::attempt(1), "h-old").await,
            "task.done of the old attempt",
        );
        assert_stale(
            s.fail(&p, "a", &Fence::attempt(1), "old failure").await,
            "failure of the old attempt",
        );
        assert_stale(
            s.mark_built(&p, "a", &Fence::holder("w1", 2), "h-old")
                .await,
            "the current attempt by someone not holding the lease",
        );
        assert_stale(
            s.mark_built(&p, "a", &Fence::attempt(2), "h-old").await,
            "a build without the holder",
        );
        let t = s.task(&p, "a").await.unwrap().unwrap();
        assert_eq!(
            (t.state, t.lease_owner.as_deref(), t.artifact.as_deref()),
            (TaskState::Leased, Some("w2"), None),
            "w2's claim is untouched"
        );
        // w2's writes land; repeating them changes nothing.
        s.mark_built(&p, "a", &new, "h-new").await.unwrap();
        s.mark_built(&p, "a", &new, "h-new").await.unwrap();
        assert_stale(
            s.mark_built(&p, "a", &new, "h-other").await,
            "another artifact for a built attempt",
        );
        assert_stale(
            s.mark_built(&p, "a", &old, "h-old").await,
            "the old holder after the build",
        );
        assert_stale(
            s.requeue(&p, "a", &Fence::attempt(1), TaskClass::Fix, None)
                .await,
            "a QA verdict on the old attempt",
        );
        assert_stale(
            s.complete(&p, "a", &Fence::attempt(1), "h-old").await,
            "task.done of the old attempt",
        );
        let done = s
            .complete(&p, "a", &Fence::attempt(2), "h-new")
            .await
            .unwrap();
        assert!(done.newly_done);
        let again = s
            .complete(&p, "a", &Fence::attempt(2), "h-new")
            .await
            .unwrap();
        assert!(!again.newly_done, "done once");
        assert_stale(
            s.complete(&p, "a", &Fence::attempt(1), "h-old").await,
            "a stale task.done after done",
        );
        s.mark_built(&p, "a", &new, "h-new").await.unwrap();
        let t = s.task(&p, "a").await.unwrap().unwrap();
        assert_eq!(
            (t.state, t.attempt, t.artifact.as_deref()),
            (TaskState::Done, 2, Some("h-new"))
        );
        assert_eq!(s.plan(&p).await.unwrap().unwrap().done, 1);

        // Reaped back to Ready (not yet claimed again): the old holder's
        // build is refused, a decision about its attempt still applies.
        claim_ok(&s, &p, "b", "w1").await;
        clock.advance(LEASE * 2).await;
        assert_eq!(
            s.reap_expired().await.unwrap(),
            vec![(p.clone(), "b".into())]
        );
        assert_stale(
            s.mark_built(&p, "b", &Fence::holder("w1", 1), "h-b").await,
            "a build after the reaper",
        );
        s.requeue(
            &p,
            "b",
            &Fence::attempt(1),
            TaskClass::New,
            Some("retry".into()),
        )
        .await
        .unwrap();
        assert_eq!(state(&s, &p, "b").await, TaskState::Ready);
    }

    pub async fn fail_blocks_transitive_dependents_and_finishes_the_plan(
        s: SharedStore,
        _clock: Clock,
    ) {
        let p = create(
            &s,
            vec![
                task("a", &[], 0),
                task("b", &["a"], 0),
                task("c", &["b"], 0),
                task("d", &["a"], 0),
                task("e", &[], 0),
            ],
        )
        .await;
        claim_ok(&s, &p, "a", "w").await;
        let f = s
            .fail(&p, "a", &fence(&s, &p, "a").await, "boom")
            .await
            .unwrap();
        assert!(f.newly_failed);
        assert_eq!(f.blocked, vec!["b", "c", "d"]);
        assert!(!f.plan_finished, "e is still to run");
        let c = s.task(&p, "c").await.unwrap().unwrap();
        assert_eq!(c.state, TaskState::Blocked);
        assert_eq!(c.error.as_deref(), Some("blocked by a: boom"));
        let a = s.task(&p, "a").await.unwrap().unwrap();
        assert_eq!((a.state, a.lease_owner.clone()), (TaskState::Failed, None));
        assert_eq!(a.error.as_deref(), Some("boom"));
        let again = s
            .fail(&p, "a", &fence(&s, &p, "a").await, "boom again")
            .await
            .unwrap();
        assert!(!again.newly_failed && again.blocked.is_empty());
        assert_eq!(
            s.task(&p, "a").await.unwrap().unwrap().error.as_deref(),
            Some("boom")
        );
        assert!(s.reap_expired().await.unwrap().is_empty(), "lease removed");

        assert_eq!(drain(&s, "w").await, vec![(p.clone(), "e".to_owned())]);
        let done = s
            .complete(&p, "e", &fence(&s, &p, "e").await, "h-e")
            .await
            .unwrap();
        assert!(done.plan_finished);
        let plan = s.plan(&p).await.unwrap().unwrap();
        assert_eq!(
            (plan.done, plan.failed, plan.blocked, plan.total),
            (1, 1, 3, 5)
        );
        assert!(s
            .fail(&p, "e", &fence(&s, &p, "e").await, "late")
            .await
            .unwrap_err()
            .to_string()
            .contains("done"));
        assert!(matches!(
            s.fail(&p, "c", &fence(&s, &p, "c").await, "x").await,
            Err(StoreError::InvalidState {
                state: TaskState::Blocked,
                ..
            })
        ));
    }

    pub async fn replay_returns_a_failed_task_and_what_it_blocked(s: SharedStore, _clock: Clock) {
        let p = create(
            &s,
            vec![
                task("a", &[], 0),
                task("x", &[], 0),
                task("b", &["a"], 0),
                task("c", &["b", "x"], 0),
            ],
        )
        .await;
        claim_ok(&s, &p, "x", "w").await;
        s.complete(&p, "x", &fence(&s, &p, "x").await, "h-x")
            .await
            .unwrap();
        claim_ok(&s, &p, "a", "w").await;
        s.requeue(
            &p,
            "a",
            &fence(&s, &p, "a").await,
            TaskClass::Fix,
            Some("lint".into()),
        )
        .await
        .unwrap();
        claim_ok(&s, &p, "a", "w").await;
        let f = s
            .fail(&p, "a", &fence(&s, &p, "a").await, "gave up")
            .await
            .unwrap();
        assert_eq!(f.blocked, vec!["b", "c"]);
        assert!(matches!(
            s.replay(&p, "b").await,
            Err(StoreError::InvalidState {
                state: TaskState::Blocked,
                ..
            })
        ));

        s.replay(&p, "a").await.unwrap();
        let a = s.task(&p, "a").await.unwrap().unwrap();
        assert_eq!(
            (a.state, a.attempt, a.class, a.error.clone()),
            (TaskState::Ready, 0, TaskClass::New, None)
        );
        let b = s.task(&p, "b").await.unwrap().unwrap();
        assert_eq!((b.state, b.error.clone()), (TaskState::Pending, None));
        assert_eq!(state(&s, &p, "c").await, TaskState::Pending);
        let plan = s.plan(&p).await.unwrap().unwrap();
        assert_eq!((plan.done, plan.failed, plan.blocked), (1, 0, 0));

        assert_eq!(claim_ok(&s, &p, "a", "w").await, 1);
        assert_eq!(
            s.complete(&p, "a", &fence(&s, &p, "a").await, "h-a")
                .await
                .unwrap()
                .released,
            vec!["b"]
        );
        claim_ok(&s, &p, "b", "w").await;
        assert_eq!(
            s.complete(&p, "b", &fence(&s, &p, "b").await, "h-b")
                .await
                .unwrap()
                .released,
            vec!["c"]
        );
        claim_ok(&s, &p, "c", "w").await;
        assert!(
            s.complete(&p, "c", &fence(&s, &p, "c").await, "h-c")
                .await
                .unwrap()
                .plan_finished
        );
    }

    pub async fn replay_keeps_tasks_blocked_by_another_failure(s: SharedStore, _clock: Clock) {
        // d depends on both a and b; both fail. Replaying a alone must leave d
        // blocked (by b), and replaying b then frees it.
        let p = create(
            &s,
            vec![
                task("a", &[], 0),
                task("b", &[], 0),
                task("d", &["a", "b"], 0),
            ],
        )
        .await;
        claim_ok(&s, &p, "a", "w").await;
        claim_ok(&s, &p, "b", "w").await;
        assert_eq!(
            s.fail(&p, "a", &fence(&s, &p, "a").await, "A")
                .await
                .unwrap()
                .blocked,
            vec!["d"]
        );
        assert!(
            s.fail(&p, "b", &fence(&s, &p, "b").await, "B")
                .await
                .unwrap()
                .blocked
                .is_empty(),
            "d already blocked"
        );
        s.replay(&p, "a").await.unwrap();
        assert_eq!(state(&s, &p, "d").await, TaskState::Blocked);
        s.replay(&p, "b").await.unwrap();
        assert_eq!(state(&s, &p, "d").await, TaskState::Pending);
        let plan = s.plan(&p).await.unwrap().unwrap();
        assert_eq!((plan.failed, plan.blocked), (0, 0));
        assert_eq!(s.ready_len().await.unwrap(), 2);
    }

    pub async fn redelivered_create_plan_creates_nothing_twice(s: SharedStore, _clock: Clock) {
        let id = unique("plan");
        let tasks = vec![task("a", &[], 0), task("b", &["a"], 0)];
        assert!(s.create_plan(plan(&id, 5), tasks.clone()).await.unwrap());
        claim_ok(&s, &id, "a", "w").await;
        let before = s.tasks(&id).await.unwrap();
        let mut other = plan(&id, 6);
        other.name = "changed".into();
        assert!(!s.create_plan(other, tasks).await.unwrap());
        assert!(!s
            .create_plan(plan(&id, 7), vec![task("zzz", &[], 9)])
            .await
            .unwrap());
        assert_eq!(s.tasks(&id).await.unwrap(), before);
        assert_eq!(s.ready_len().await.unwrap(), 0);
        let stored = s.plan(&id).await.unwrap().unwrap();
        assert_eq!(
            stored.name,
            format!("name of {id}"),
            "the first delivery's plan is kept"
        );
        assert_eq!((stored.total, stored.created_ms), (2, 5));
        assert_eq!(s.plans().await.unwrap().len(), 1);
    }

    pub async fn a_bad_plan_creates_nothing(s: SharedStore, _clock: Clock) {
        let id = unique("plan");
        let err = s
            .create_plan(
                plan(&id, 1),
                vec![task("a", &[], 0), task("b", &["a", "ghost.py"], 0)],
            )
            .await
            .unwrap_err();
        match err {
            StoreError::UnknownDependency {
                plan_id,
                path,
                dependency,
            } => assert_eq!(
                (plan_id.as_str(), path.as_str(), dependency.as_str()),
                (id.as_str(), "b", "ghost.py")
            ),
            other => panic!("expected UnknownDependency, got {other}"),
        }
        let dup = s
            .create_plan(plan(&id, 1), vec![task("a", &[], 0), task("a", &[], 0)])
            .await;
        assert!(matches!(dup, Err(StoreError::DuplicateTask { ref path, .. }) if path == "a"));
        let bad_id = s
            .create_plan(plan("has:colon", 1), vec![task("a", &[], 0)])
            .await;
        assert!(matches!(bad_id, Err(StoreError::InvalidPlanId { .. })));
        assert!(s.plan(&id).await.unwrap().is_none());
        assert!(s.plans().await.unwrap().is_empty());
        assert_eq!(s.ready_len().await.unwrap(), 0);
        assert!(s.task(&id, "a").await.unwrap().is_none());
        assert!(matches!(
            s.tasks(&id).await,
            Err(StoreError::UnknownPlan { .. })
        ));
        // The same id still works once the plan is fixed.
        assert!(s
            .create_plan(plan(&id, 1), vec![task("a", &[], 0)])
            .await
            .unwrap());
    }

    pub async fn records_round_trip_and_tasks_list_in_path_order(s: SharedStore, _clock: Clock) {
        let mut rich = task("src/ü/main.py", &["lib|x.py", "a:b.py"], u32::MAX);
        rich.content = Some("print('héllo')\n\ttabs \"quotes\" \u{1F600}".into());
        rich.executor = Some("openai".into());
        rich.estimate = 42;
        let p = create_at(
            &s,
            vec![
                task("lib|x.py", &[], 0),
                rich.clone(),
                task("a:b.py", &[], 0),
                task("empty", &[], 3),
            ],
            1_700_000_000_123,
        )
        .await;
        let tasks = s.tasks(&p).await.unwrap();
        let paths: Vec<&str> = tasks.iter().map(|t| t.path.as_str()).collect();
        assert_eq!(paths, vec!["a:b.py", "empty", "lib|x.py", "src/ü/main.py"]);
        let r = s.task(&p, "src/ü/main.py").await.unwrap().unwrap();
        assert_eq!(r.plan_id, p);
        assert_eq!(r.spec, rich.spec);
        assert_eq!(r.content, rich.content);
        assert_eq!(r.executor.as_deref(), Some("openai"));
        assert_eq!(r.depends_on, vec!["lib|x.py", "a:b.py"]);
        assert_eq!((r.priority, r.estimate, r.attempt), (u32::MAX, 42, 0));
        assert_eq!((r.state, r.class), (TaskState::Pending, TaskClass::New));
        assert_eq!(r.updated_ms, 1_700_000_000_123);
        assert_eq!(
            (
                r.lease_owner.clone(),
                r.lease_expires_ms,
                r.artifact.clone(),
                r.error.clone()
            ),
            (None, None, None, None)
        );
        let lib = s.task(&p, "lib|x.py").await.unwrap().unwrap();
        assert_eq!(lib.dependents, vec!["src/ü/main.py"]);
        assert_eq!(lib.content, None);
        // Paths with ':' and '|' are keys like any other.
        assert_eq!(drain(&s, "w").await.len(), 3);
        s.complete(&p, "lib|x.py", &fence(&s, &p, "lib|x.py").await, "h")
            .await
            .unwrap();
        let done = s
            .complete(&p, "a:b.py", &fence(&s, &p, "a:b.py").await, "h")
            .await
            .unwrap();
        assert_eq!(done.released, vec!["src/ü/main.py"]);
        assert!(s.task(&p, "nope").await.unwrap().is_none());
    }

    pub async fn mark_built_requeue_and_complete_check_the_state(s: SharedStore, _clock: Clock) {
        let p = create(&s, vec![task("a", &[], 0), task("b", &["a"], 0)]).await;
        let invalid = |r: Result<(), StoreError>, want: TaskState| match r {
            Err(StoreError::InvalidState { state, .. }) => assert_eq!(state, want),
            other => panic!("expected InvalidState({want:?}), got {other:?}"),
        };
        assert_stale(
            s.mark_built(&p, "a", &Fence::holder("w", 0), "h").await,
            "a build of an unclaimed task",
        );
        invalid(
            s.mark_built(&p, "b", &Fence::holder("w", 0), "h").await,
            TaskState::Pending,
        );
        invalid(
            s.requeue(&p, "b", &fence(&s, &p, "b").await, TaskClass::Fix, None)
                .await,
            TaskState::Pending,
        );
        let err = s
            .complete(&p, "b", &fence(&s, &p, "b").await, "h")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("pending"), "{err}");
        assert!(matches!(
            s.complete(&p, "zz", &fence(&s, &p, "zz").await, "h").await,
            Err(StoreError::UnknownTask { .. })
        ));

        claim_ok(&s, &p, "a", "w").await;
        s.mark_built(&p, "a", &fence(&s, &p, "a").await, "h1")
            .await
            .unwrap();
        let a = s.task(&p, "a").await.unwrap().unwrap();
        assert_eq!(
            (a.state, a.artifact.as_deref(), a.lease_owner.as_deref()),
            (TaskState::Built, Some("h1"), None)
        );
        assert!(
            s.reap_expired().await.unwrap().is_empty(),
            "built: no lease"
        );
        assert_eq!(
            s.claim(&p, "a", "w", None, LEASE).await.unwrap(),
            ClaimOutcome::NotClaimable(TaskState::Built)
        );
        s.requeue(
            &p,
            "a",
            &fence(&s, &p, "a").await,
            TaskClass::Fix,
            Some("2 tests failed".into()),
        )
        .await
        .unwrap();
        let a = s.task(&p, "a").await.unwrap().unwrap();
        assert_eq!(
            (a.state, a.class, a.attempt),
            (TaskState::Ready, TaskClass::Fix, 1)
        );
        assert_eq!(a.error.as_deref(), Some("2 tests failed"));
        assert_eq!(claim_ok(&s, &p, "a", "w").await, 2);
        s.requeue(&p, "a", &fence(&s, &p, "a").await, TaskClass::New, None)
            .await
            .unwrap();
        assert_eq!(s.task(&p, "a").await.unwrap().unwrap().error, None);
        claim_ok(&s, &p, "a", "w").await;
        s.mark_built(&p, "a", &fence(&s, &p, "a").await, "h2")
            .await
            .unwrap();
        s.complete(&p, "a", &fence(&s, &p, "a").await, "h2")
            .await
            .unwrap();
        s.mark_built(&p, "a", &fence(&s, &p, "a").await, "h3")
            .await
            .unwrap();
        assert_eq!(
            s.task(&p, "a").await.unwrap().unwrap().artifact.as_deref(),
            Some("h2"),
            "a late built after done changes nothing"
        );
        invalid(
            s.requeue(&p, "a", &fence(&s, &p, "a").await, TaskClass::Fix, None)
                .await,
            TaskState::Done,
        );
    }

    pub async fn plans_are_listed_newest_first(s: SharedStore, _clock: Clock) {
        let old = create_at(&s, vec![task("a", &[], 0)], 100).await;
        let new = create_at(&s, vec![task("a", &[], 0), task("b", &[], 0)], 300).await;
        let mid = create_at(&s, vec![], 200).await;
        let ids: Vec<String> = s.plans().await.unwrap().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![new.clone(), mid.clone(), old]);
        let n = s.plan(&new).await.unwrap().unwrap();
        assert_eq!(
            (n.total, n.status, n.detail.as_str()),
            (2, PlanStatus::Running, "{\"opaque\":true}")
        );
        s.set_plan_status(&new, PlanStatus::Failed, Some("integration failed".into()))
            .await
            .unwrap();
        let n = s.plan(&new).await.unwrap().unwrap();
        assert_eq!(
            (n.status, n.message.as_deref()),
            (PlanStatus::Failed, Some("integration failed"))
        );
        s.set_plan_status(&new, PlanStatus::Succeeded, None)
            .await
            .unwrap();
        assert_eq!(s.plan(&new).await.unwrap().unwrap().message, None);
        assert!(matches!(
            s.set_plan_status("missing", PlanStatus::Running, None)
                .await,
            Err(StoreError::UnknownPlan { .. })
        ));
        assert!(s.tasks(&mid).await.unwrap().is_empty());
        assert!(s.plan("missing").await.unwrap().is_none());
    }

    pub async fn token_buckets_take_refill_and_drain_by_the_store_clock(
        s: SharedStore,
        clock: Clock,
    ) {
        use devfleet_store::{BucketRate, BucketStep};
        let rate = BucketRate {
            capacity: 3,
            window: Duration::from_secs(60),
        };
        let take = |n| BucketStep::Take(n);
        // A new bucket is full: three takes, then a wait of a third of the
        // window (one token refills in 20 s).
        for _ in 0..3 {
            assert_eq!(s.token_bucket("rpm", rate, take(1)).await.unwrap(), None);
        }
        let wait = s.token_bucket("rpm", rate, take(1)).await.unwrap().unwrap();
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        // Buckets are independent.
        assert_eq!(s.token_bucket("other", rate, take(2)).await.unwrap(), None);
        // The refill follows the store's clock.
        clock.advance(Duration::from_secs(21)).await;
        assert_eq!(s.token_bucket("rpm", rate, take(1)).await.unwrap(), None);
        assert!(s
            .token_bucket("rpm", rate, take(1))
            .await
            .unwrap()
            .is_some());
        // Never more than the capacity, however long it was idle.
        clock.advance(Duration::from_secs(600)).await;
        for _ in 0..3 {
            assert_eq!(s.token_bucket("rpm", rate, take(1)).await.unwrap(), None);
        }
        assert!(s
            .token_bucket("rpm", rate, take(1))
            .await
            .unwrap()
            .is_some());
        // A drain (Retry-After) makes the next take wait at least that long.
        clock.advance(Duration::from_secs(600)).await;
        assert_eq!(
            s.token_bucket("rpm", rate, BucketStep::Drain(Duration::from_secs(30)))
                .await
                .unwrap(),
            None
        );
        let wait = s.token_bucket("rpm", rate, take(1)).await.unwrap().unwrap();
        assert!(wait >= Duration::from_secs(30), "{wait:?}");
        // A take larger than the capacity waits for a full bucket, then
        // leaves it in debt.
        let big = BucketRate {
            capacity: 100,
            window: Duration::from_secs(60),
        };
        assert_eq!(s.token_bucket("tpm", big, take(250)).await.unwrap(), None);
        let wait = s.token_bucket("tpm", big, take(1)).await.unwrap().unwrap();
        assert!(wait > Duration::from_secs(90), "{wait:?}");
    }

    pub async fn a_snapshot_round_trips_and_materialises(s: SharedStore, _clock: Clock) {
        use devfleet_store::snapshot::{self, Limits, SnapshotCache};
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("pkg")).unwrap();
        std::fs::write(base.path().join("pkg/util.py"), "def f():\n    return 1\n").unwrap();
        std::fs::write(base.path().join("README.md"), "same\n").unwrap();
        std::fs::write(base.path().join("COPY.md"), "same\n").unwrap();
        let built = snapshot::build(base.path(), Limits::default()).unwrap();
        assert_eq!(built.blobs.len(), 2, "identical files share one blob");
        let id = built.store(s.as_ref()).await.unwrap();
        assert_eq!(id, built.id(), "the id is the manifest blob's hash");
        assert_eq!(
            built.store(s.as_ref()).await.unwrap(),
            id,
            "storing again is harmless"
        );
        let manifest = snapshot::load(s.as_ref(), &id).await.unwrap().unwrap();
        assert_eq!(manifest, built.manifest);
        assert_eq!(
            snapshot::read_file(s.as_ref(), &manifest, "pkg/util.py")
                .await
                .unwrap()
                .as_deref(),
            Some("def f():\n    return 1\n")
        );
        assert_eq!(
            snapshot::load(s.as_ref(), &"0".repeat(64)).await.unwrap(),
            None
        );

        let cache_dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(cache_dir.path(), 1);
        let dir = cache.materialise(s.as_ref(), &id).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("pkg/util.py")).unwrap(),
            "def f():\n    return 1\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("COPY.md")).unwrap(),
            "same\n"
        );
        assert_eq!(
            cache.materialise(s.as_ref(), &id).await.unwrap(),
            dir,
            "cached"
        );

        // A second snapshot evicts the first from a cache keeping one.
        std::fs::write(base.path().join("new.py"), "x = 1\n").unwrap();
        let other = snapshot::build(base.path(), Limits::default()).unwrap();
        let other_id = other.store(s.as_ref()).await.unwrap();
        assert_ne!(other_id, id);
        let other_dir = cache.materialise(s.as_ref(), &other_id).await.unwrap();
        assert!(other_dir.join("new.py").is_file());
        assert!(!dir.exists(), "the least recently used snapshot is evicted");

        let missing = cache.materialise(s.as_ref(), &"1".repeat(64)).await;
        assert!(
            matches!(&missing, Err(e) if e.to_string().contains("not in the store")),
            "{missing:?}"
        );
    }

    pub async fn cache_artifacts_and_counters(s: SharedStore, _clock: Clock) {
        assert_eq!(s.cache_get("k1").await.unwrap(), None);
        s.cache_put("k1", "hash-1").await.unwrap();
        s.cache_put("k1", "hash-2").await.unwrap();
        assert_eq!(s.cache_get("k1").await.unwrap().as_deref(), Some("hash-2"));

        let bytes = vec![0u8, 159, 146, 150, 255, b'\n'];
        let h = s.put_artifact(&bytes).await.unwrap();
        assert_eq!(h, content_hash(&bytes));
        assert_eq!(s.put_artifact(&bytes).await.unwrap(), h);
        assert_eq!(s.artifact(&h).await.unwrap(), Some(bytes));
        assert_eq!(s.artifact(&content_hash(b"other")).await.unwrap(), None);
        let empty = s.put_artifact(b"").await.unwrap();
        assert_eq!(s.artifact(&empty).await.unwrap(), Some(Vec::new()));

        assert_eq!(s.counter("c").await.unwrap(), 0);
        assert_eq!(s.incr("c", 5).await.unwrap(), 5);
        assert_eq!(s.incr("c", -2).await.unwrap(), 3);
        assert_eq!(s.counter("c").await.unwrap(), 3);
        assert_eq!(s.counter("other").await.unwrap(), 0);
    }

    pub async fn kv_collections_put_get_list_delete(s: SharedStore, _clock: Clock) {
        s.kv_put("canary", "b", "2", None).await.unwrap();
        s.kv_put("canary", "a", "1", None).await.unwrap();
        s.kv_put("canary", "a", "1bis", None).await.unwrap();
        s.kv_put("dlq", "a", "other collection", None)
            .await
            .unwrap();
        assert_eq!(
            s.kv_list("canary").await.unwrap(),
            vec![("a".into(), "1bis".into()), ("b".into(), "2".into())]
        );
        assert_eq!(
            s.kv_get("canary", "a").await.unwrap().as_deref(),
            Some("1bis")
        );
        assert_eq!(s.kv_get("canary", "zz").await.unwrap(), None);
        assert!(!s.kv_put_new("canary", "a", "x").await.unwrap());
        assert_eq!(
            s.kv_get("canary", "a").await.unwrap().as_deref(),
            Some("1bis")
        );
        assert!(s.kv_put_new("canary", "c", "3").await.unwrap());
        assert!(s.kv_delete("canary", "a").await.unwrap());
        assert!(!s.kv_delete("canary", "a").await.unwrap());
        assert_eq!(
            s.kv_list("canary").await.unwrap(),
            vec![("b".into(), "2".into()), ("c".into(), "3".into())]
        );
        assert_eq!(s.kv_list("dlq").await.unwrap().len(), 1);
        assert!(s.kv_list("never-used").await.unwrap().is_empty());
    }

    pub async fn kv_records_with_a_ttl_expire(s: SharedStore, _clock: Clock) {
        // Long enough that the "not expired yet" check cannot race it.
        let ttl = Some(Duration::from_secs(2));
        s.kv_put("breaker", "short", "open", ttl).await.unwrap();
        s.kv_put("breaker", "kept", "v1", ttl).await.unwrap();
        // Rewriting without a TTL makes the record permanent.
        s.kv_put("breaker", "kept", "v2", None).await.unwrap();
        s.kv_put("breaker", "forever", "x", None).await.unwrap();
        assert!(
            !s.kv_put_new("breaker", "short", "again").await.unwrap(),
            "not expired yet"
        );
        wait_for(
            "the TTL'd record to expire",
            Duration::from_secs(20),
            || {
                let s = s.clone();
                async move {
                    s.kv_get("breaker", "short")
                        .await
                        .unwrap()
                        .is_none()
                        .then_some(())
                }
            },
        )
        .await;
        assert_eq!(
            s.kv_list("breaker").await.unwrap(),
            vec![("forever".into(), "x".into()), ("kept".into(), "v2".into())]
        );
        assert!(!s.kv_delete("breaker", "short").await.unwrap());
        assert!(
            s.kv_put_new("breaker", "short", "again").await.unwrap(),
            "expired counts as absent"
        );
        assert_eq!(
            s.kv_get("breaker", "short").await.unwrap().as_deref(),
            Some("again")
        );
        // Expiry is also honoured by a list that is the first to look.
        s.kv_put("breaker2", "gone", "x", Some(Duration::from_millis(300)))
            .await
            .unwrap();
        wait_for(
            "a list without the expired record",
            Duration::from_secs(20),
            || {
                let s = s.clone();
                async move {
                    s.kv_list("breaker2")
                        .await
                        .unwrap()
                        .is_empty()
                        .then_some(())
                }
            },
        )
        .await;
    }

    // Compare-and-delete and retention.

    pub async fn kv_delete_if_removes_only_the_value_it_names(s: SharedStore, _clock: Clock) {
        s.kv_put("parked", "k", "v1", None).await.unwrap();
        assert!(!s.kv_delete_if("parked", "k", "v0").await.unwrap());
        assert!(!s.kv_delete_if("parked", "absent", "v1").await.unwrap());
        assert!(!s.kv_delete_if("nothing", "k", "v1").await.unwrap());
        assert_eq!(
            s.kv_get("parked", "k").await.unwrap().as_deref(),
            Some("v1"),
            "a newer value survives"
        );
        assert!(s.kv_delete_if("parked", "k", "v1").await.unwrap());
        assert_eq!(s.kv_get("parked", "k").await.unwrap(), None);
        assert!(!s.kv_delete_if("parked", "k", "v1").await.unwrap());
    }

    pub async fn delete_plan_collects_only_finished_plans_older_than_the_cutoff(
        s: SharedStore,
        clock: Clock,
    ) {
        let live = create(&s, vec![task("a", &[], 0), task("b", &["a"], 0)]).await;
        let done = create(&s, vec![task("a", &[], 0), task("b", &[], 0)]).await;
        // One of the finished plan's tasks still holds a lease, the other
        // is still Ready (a plan that failed early): both go with it.
        s.claim(&done, "a", "w", None, LEASE).await.unwrap();
        s.set_plan_status(&done, PlanStatus::Failed, None)
            .await
            .unwrap();
        let after = i64::MAX;
        assert!(
            !s.delete_plan(&live, after).await.unwrap(),
            "a running plan is never collected"
        );
        let updated = s.plan(&done).await.unwrap().unwrap().updated_ms;
        assert!(
            !s.delete_plan(&done, updated).await.unwrap(),
            "not older than the cutoff"
        );
        assert!(!s.delete_plan("no-such-plan", after).await.unwrap());
        assert!(s.delete_plan(&done, after).await.unwrap());
        assert_eq!(s.plan(&done).await.unwrap(), None);
        assert_eq!(s.task(&done, "a").await.unwrap(), None);
        assert!(matches!(
            s.tasks(&done).await,
            Err(StoreError::UnknownPlan { .. })
        ));
        assert!(!s.plans().await.unwrap().iter().any(|p| p.id == done));
        assert_eq!(
            drain(&s, "w2").await,
            vec![(live.clone(), "a".to_owned())],
            "the collected plan left nothing in the ready set"
        );
        clock.advance(LEASE * 2).await;
        assert_eq!(
            s.reap_expired().await.unwrap(),
            vec![(live.clone(), "a".to_owned())],
            "nor in the lease set"
        );
        assert!(!s.delete_plan(&done, after).await.unwrap(), "once");
    }

    pub async fn cache_entries_and_artifacts_are_deleted_only_if_older_than_the_cutoff(
        s: SharedStore,
        _clock: Clock,
    ) {
        let hash = s.put_artifact(b"shared bytes").await.unwrap();
        s.cache_put("k1", &hash).await.unwrap();
        let entries = s.cache_entries().await.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            (entries[0].key.as_str(), entries[0].artifact.as_str()),
            ("k1", hash.as_str())
        );
        let hashes = s.artifact_hashes().await.unwrap();
        assert_eq!(hashes.len(), 1);
        assert_eq!(hashes[0].0, hash);
        let (cache_written, artifact_written) = (entries[0].written_ms, hashes[0].1);
        assert!(!s.cache_delete("k1", cache_written).await.unwrap());
        assert!(!s.delete_artifact(&hash, artifact_written).await.unwrap());
        assert!(!s.cache_delete("absent", i64::MAX).await.unwrap());
        assert!(!s.delete_artifact("absent", i64::MAX).await.unwrap());
        assert_eq!(
            s.cache_get("k1").await.unwrap().as_deref(),
            Some(hash.as_str())
        );
        assert!(s.artifact(&hash).await.unwrap().is_some());
        assert!(s.cache_delete("k1", i64::MAX).await.unwrap());
        assert!(s.delete_artifact(&hash, i64::MAX).await.unwrap());
        assert_eq!(s.cache_get("k1").await.unwrap(), None);
        assert_eq!(s.artifact(&hash).await.unwrap(), None);
        assert!(s.cache_entries().await.unwrap().is_empty());
        assert!(s.artifact_hashes().await.unwrap().is_empty());
        // Storing the bytes again brings them back with a fresh time.
        assert_eq!(s.put_artifact(b"shared bytes").await.unwrap(), hash);
        assert_eq!(s.artifact_hashes().await.unwrap().len(), 1);
    }

    pub async fn usage_is_recorded_once_per_run_by_task_plan_and_model(
        s: SharedStore,
        _clock: Clock,
    ) {
        let id = create(&s, vec![task("a", &[], 0), task("b", &[], 0)]).await;
        let first = [
            usage("openai", "m1", 100, 20, 0.001_5),
            usage("openai", "m2", 5, 5, 0.0),
        ];
        assert!(s.record_usage(&id, "a", 1, &first).await.unwrap());
        assert!(
            !s.record_usage(&id, "a", 1, &first).await.unwrap(),
            "a redelivered run counts once"
        );
        assert!(s
            .record_usage(&id, "a", 2, &[usage("openai", "m1", 10, 10, 0.000_5)])
            .await
            .unwrap());
        let mut agent = usage("", "claude", 7, 3, 0.25);
        agent.estimated = true;
        assert!(s.record_usage(&id, "b", 1, &[agent]).await.unwrap());
        let u = s.plan_usage(&id).await.unwrap();
        let m1 = UsageTotals {
            calls: 2,
            tokens_in: 110,
            tokens_out: 30,
            cost_nusd: 2_000_000,
            estimated: 0,
        };
        assert_eq!(u.by_model.get("openai/m1"), Some(&m1));
        assert_eq!(u.by_model.get("openai/m2").map(|t| t.tokens()), Some(10));
        let claude = u.by_model.get("claude").copied().unwrap_or_default();
        assert_eq!((claude.cost_nusd, claude.estimated), (250_000_000, 1));
        assert_eq!(
            u.by_task.get("a").map(|t| (t.calls, t.tokens())),
            Some((3, 150))
        );
        assert_eq!(u.by_task.get("b").map(|t| t.tokens_in), Some(7));
        assert_eq!(
            (u.total.calls, u.total.tokens(), u.total.cost_nusd),
            (4, 160, 252_000_000)
        );
        assert!((u.total.cost_usd() - 0.252).abs() < 1e-12);
        let fleet = s.usage_by_model().await.unwrap();
        assert_eq!(fleet.get("openai/m1"), Some(&m1));
        assert_eq!(fleet.len(), 3);
        assert!(matches!(
            s.record_usage("no-such-plan", "a", 1, &first).await,
            Err(StoreError::UnknownPlan { .. })
        ));
        // Concurrent recordings of one run: exactly one counts.
        let mut racers = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let s = s.clone();
            let id = id.clone();
            racers.spawn(async move {
                s.record_usage(&id, "b", 2, &[usage("", "claude", 1, 1, 0.0)])
                    .await
                    .unwrap()
            });
        }
        let mut won = 0;
        while let Some(r) = racers.join_next().await {
            won += usize::from(r.unwrap());
        }
        assert_eq!(won, 1);
        assert_eq!(s.plan_usage(&id).await.unwrap().total.calls, 5);
        // A collected plan takes its usage with it; the fleet's stays.
        s.set_plan_status(&id, PlanStatus::Succeeded, None)
            .await
            .unwrap();
        assert!(s.delete_plan(&id, i64::MAX).await.unwrap());
        assert!(s.plan_usage(&id).await.unwrap().is_empty());
        assert_eq!(
            s.usage_by_model().await.unwrap().get("openai/m1"),
            Some(&m1)
        );
    }
}

mod budget_checks {
    use super::*;

    fn spend(tokens: u64, cost_nusd: u64) -> Spend {
        Spend { tokens, cost_nusd }
    }

    fn tokens(max: u64) -> BudgetLimits {
        BudgetLimits {
            max_tokens: Some(max),
            max_cost_nusd: None,
        }
    }

    async fn granted(s: &SharedStore, id: &str, path: &str, attempt: u32, expected: Spend) -> bool {
        match s
            .reserve_budget(id, path, attempt, expected, BudgetLimits::default())
            .await
            .unwrap()
        {
            Reservation::Granted => true,
            Reservation::Exhausted { .. } => false,
        }
    }

    pub async fn budget_reservations_reconcile_with_actual_usage(s: SharedStore, _clock: Clock) {
        let id = create(&s, vec![task("a", &[], 0), task("b", &[], 0)]).await;
        assert_eq!(s.budget(&id).await.unwrap(), BudgetState::default());
        assert!(
            granted(&s, &id, "a", 1, spend(1_000_000, 5)).await,
            "no limits: anything goes"
        );
        assert_eq!(s.budget(&id).await.unwrap().reserved, Spend::default());
        let limits = BudgetLimits {
            max_tokens: Some(1000),
            max_cost_nusd: Some(1_000_000_000),
        };
        s.set_budget(&id, limits).await.unwrap();
        assert!(granted(&s, &id, "a", 1, spend(600, 100)).await);
        assert!(granted(&s, &id, "a", 1, spend(600, 100)).await, "a repeat");
        assert_eq!(s.budget(&id).await.unwrap().reserved, spend(600, 100));
        match s
            .reserve_budget(&id, "b", 1, spend(500, 0), BudgetLimits::default())
            .await
            .unwrap()
        {
            Reservation::Exhausted {
                limits: l,
                spent,
                reserved,
            } => {
                assert_eq!(l, limits);
                assert_eq!((spent, reserved), (spend(0, 0), spend(600, 100)));
            }
            other => panic!("600 + 500 > 1000 tokens: {other:?}"),
        }
        // Reconciled: the reservation goes, the actual usage (400) stays.
        let used = usage("p", "m", 300, 100, 0.25);
        assert!(s.record_usage(&id, "a", 1, &[used]).await.unwrap());
        let b = s.budget(&id).await.unwrap();
        assert_eq!(
            (b.limits, b.spent, b.reserved),
            (Some(limits), spend(400, 250_000_000), spend(0, 0))
        );
        assert!(granted(&s, &id, "b", 1, spend(500, 0)).await);
        // A failed run releases its reservation and spends nothing.
        assert!(s.record_usage(&id, "b", 1, &[]).await.unwrap());
        assert_eq!(s.budget(&id).await.unwrap().reserved, spend(0, 0));
        // An unestimated run goes while the limit is not reached...
        assert!(granted(&s, &id, "b", 2, Spend::default()).await);
        let big = usage("p", "m", 500, 100, 0.0);
        assert!(s.record_usage(&id, "b", 2, &[big]).await.unwrap());
        assert_eq!(s.budget(&id).await.unwrap().spent.tokens, 1000);
        // ...and not once it is; raising the budget lets it go again.
        assert!(!granted(&s, &id, "b", 3, Spend::default()).await);
        s.set_budget(&id, tokens(2000)).await.unwrap();
        assert!(granted(&s, &id, "b", 3, Spend::default()).await);
        // A plan with no budget of its own uses the caller's default.
        let other = create(&s, vec![task("a", &[], 0)]).await;
        let r = s
            .reserve_budget(&other, "a", 1, spend(20, 0), tokens(10))
            .await
            .unwrap();
        assert!(matches!(r, Reservation::Exhausted { .. }), "{r:?}");
        assert!(matches!(
            s.reserve_budget("no-such-plan", "a", 1, spend(1, 1), tokens(10))
                .await,
            Err(StoreError::UnknownPlan { .. })
        ));
        // A budget set before its plan exists is the plan's once it does.
        s.set_budget("later", tokens(5)).await.unwrap();
        s.create_plan(plan("later", 1), vec![task("a", &[], 0)])
            .await
            .unwrap();
        let r = s
            .reserve_budget("later", "a", 1, spend(6, 0), BudgetLimits::default())
            .await
            .unwrap();
        assert!(matches!(r, Reservation::Exhausted { .. }), "{r:?}");
    }

    pub async fn claim_next_holds_back_a_plan_whose_budget_is_exhausted(
        s: SharedStore,
        _clock: Clock,
    ) {
        let paused = create(&s, vec![task("a", &[], 9), task("b", &[], 9)]).await;
        let other = create(&s, vec![task("c", &[], 1)]).await;
        s.set_plan_status(&paused, PlanStatus::BudgetExhausted, None)
            .await
            .unwrap();
        let got = s.claim_next("w", LEASE).await.unwrap().map(|t| t.path);
        assert_eq!(
            got.as_deref(),
            Some("c"),
            "the other plan's task, though lower"
        );
        assert_eq!(s.claim_next("w", LEASE).await.unwrap(), None);
        assert_eq!(
            state(&s, &paused, "a").await,
            TaskState::Ready,
            "left in place"
        );
        assert_eq!(s.ready_len().await.unwrap(), 2);
        s.set_plan_status(&paused, PlanStatus::Running, None)
            .await
            .unwrap();
        let got = s.claim_next("w", LEASE).await.unwrap().map(|t| t.path);
        assert_eq!(got.as_deref(), Some("a"), "in its order again");
        let _ = other;
    }

    /// A worker that dies (or is paused past its lease) never reconciles
    /// its run: the reservation goes when the lease expires (reaper) or
    /// another worker takes the task over, so a crash cannot shrink a
    /// plan's budget for good. A late `record_usage` of the lost run still
    /// counts what it spent, once.
    pub async fn a_lost_leases_reservation_is_released(s: SharedStore, clock: Clock) {
        let id = create(&s, vec![task("a", &[], 0), task("b", &[], 0)]).await;
        s.set_budget(&id, tokens(1000)).await.unwrap();
        let a = s.claim_next("w1", LEASE).await.unwrap().unwrap();
        assert!(granted(&s, &id, &a.path, a.attempt, spend(600, 0)).await);
        let b = s.claim_next("w1", LEASE).await.unwrap().unwrap();
        assert!(granted(&s, &id, &b.path, b.attempt, spend(300, 0)).await);
        assert_eq!(s.budget(&id).await.unwrap().reserved, spend(900, 0));
        // w1 dies. The reaper returns "a" and releases its 600...
        clock.advance(LEASE * 2).await;
        let mut reaped = s.reap_expired().await.unwrap();
        reaped.sort();
        assert_eq!(reaped.len(), 2, "{reaped:?}");
        assert_eq!(s.budget(&id).await.unwrap().reserved, spend(0, 0));
        // ...so w2's next attempt fits where it would not have.
        let again = s.claim_next("w2", LEASE).await.unwrap().unwrap();
        assert_eq!(again.attempt, 2);
        assert!(granted(&s, &id, &again.path, 2, spend(900, 0)).await);
        // Taken over without a reaper: the claim of the expired lease
        // releases attempt 2's reservation as it starts attempt 3.
        clock.advance(LEASE * 2).await;
        assert_eq!(claim_ok(&s, &id, &again.path, "w3").await, 3);
        assert_eq!(s.budget(&id).await.unwrap().reserved, spend(0, 0));
        // The lost run of attempt 1 reports late: what it spent counts once.
        let used = usage("p", "m", 500, 50, 0.0);
        assert!(s
            .record_usage(&id, &a.path, 1, std::slice::from_ref(&used))
            .await
            .unwrap());
        assert!(!s.record_usage(&id, &a.path, 1, &[used]).await.unwrap());
        let b = s.budget(&id).await.unwrap();
        assert_eq!((b.spent, b.reserved), (spend(550, 0), spend(0, 0)));
    }

    pub async fn concurrent_reservations_never_overshoot_the_budget(s: SharedStore, _clock: Clock) {
        let paths: Vec<String> = (0..24).map(|i| format!("t{i:02}")).collect();
        let id = create(&s, paths.iter().map(|p| task(p, &[], 0)).collect()).await;
        s.set_budget(&id, tokens(1000)).await.unwrap();
        let mut racers = tokio::task::JoinSet::new();
        for path in paths {
            let (s, id) = (s.clone(), id.clone());
            racers.spawn(async move { granted(&s, &id, &path, 1, spend(100, 0)).await });
        }
        let mut won = 0;
        while let Some(r) = racers.join_next().await {
            won += usize::from(r.unwrap());
        }
        assert_eq!(won, 10, "exactly what the budget covers");
        assert_eq!(s.budget(&id).await.unwrap().reserved, spend(1000, 0));
    }
}

fn usage(provider: &str, model: &str, tokens_in: u64, tokens_out: u64, cost_usd: f64) -> Usage {
    Usage {
        provider: provider.to_owned(),
        model: model.to_owned(),
        tokens_in,
        tokens_out,
        cost_usd,
        estimated: false,
    }
}

/// Generates the conformance tests for one backend: `$prefix` names the
/// module (and so the test names), `$make` is an expression producing a
/// future of a fresh, empty [`SharedStore`].
macro_rules! store_suite {
    ($prefix:ident, $make:expr) => {
        mod $prefix {
            use super::*;

            store_suite!(@tests $make;
                ready_order_is_fix_first_then_priority_then_fifo_across_plans,
                a_task_becomes_ready_exactly_when_its_last_dependency_completes,
                duplicate_completion_is_a_no_op,
                concurrent_claims_hand_each_task_out_exactly_once,
                expired_lease_makes_task_claimable_again,
                lease_times_come_from_the_store_clock,
                a_worker_paused_past_its_lease_cannot_overwrite_its_successor,
                renew_extends_for_the_owner_and_fails_for_a_stranger,
                handoff_passes_the_lease_without_a_new_attempt,
                fail_blocks_transitive_dependents_and_finishes_the_plan,
                replay_returns_a_failed_task_and_what_it_blocked,
                replay_keeps_tasks_blocked_by_another_failure,
                redelivered_create_plan_creates_nothing_twice,
                a_bad_plan_creates_nothing,
                records_round_trip_and_tasks_list_in_path_order,
                mark_built_requeue_and_complete_check_the_state,
                plans_are_listed_newest_first,
                cache_artifacts_and_counters,
                token_buckets_take_refill_and_drain_by_the_store_clock,
                a_snapshot_round_trips_and_materialises,
                kv_collections_put_get_list_delete,
                kv_records_with_a_ttl_expire,
                kv_delete_if_removes_only_the_value_it_names,
                delete_plan_collects_only_finished_plans_older_than_the_cutoff,
                cache_entries_and_artifacts_are_deleted_only_if_older_than_the_cutoff,
                usage_is_recorded_once_per_run_by_task_plan_and_model,
            );
            store_suite!(@budget $make;
                budget_reservations_reconcile_with_actual_usage,
                concurrent_reservations_never_overshoot_the_budget,
                claim_next_holds_back_a_plan_whose_budget_is_exhausted,
                a_lost_leases_reservation_is_released,
            );
        }
    };
    (@budget $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let (store, clock) = $make.await;
                budget_checks::$name(store, clock).await;
            }
        )*
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let (store, clock) = $make.await;
                checks::$name(store, clock).await;
            }
        )*
    };
}

store_suite!(memory, memory_store());
store_suite!(redis, redis_store());

// ---------------------------------------------------------------------------
// Redis only.

#[tokio::test]
async fn redis_unreachable_server_fails_with_an_error_naming_the_url() {
    let url = "redis://:hunter2@127.0.0.1:1/";
    let err = within(
        "connecting to a closed port",
        Duration::from_secs(60),
        RedisStore::connect(url, "x"),
    )
    .await
    .expect_err("nothing listens on port 1");
    let text = err.to_string();
    assert!(matches!(err, StoreError::Connect { .. }), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("hunter2"), "password leaked: {text}");
    assert!(matches!(
        RedisStore::connect("not a url", "x").await,
        Err(StoreError::InvalidUrl { .. })
    ));
}

#[tokio::test]
async fn redis_corrupt_records_are_errors_not_panics() {
    let prefix = unique("t");
    let store: SharedStore = Arc::new(connect_redis(&prefix).await);
    let p = create(&store, vec![task("a", &[], 0), task("b", &["a"], 0)]).await;
    let client = ::redis::Client::open(redis_url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}:task:{p}:b");
    let _: () = ::redis::cmd("HSET")
        .arg(&key)
        .arg("attempt")
        .arg("many")
        .query_async(&mut con)
        .await
        .unwrap();
    match store.task(&p, "b").await {
        Err(StoreError::Corrupt { key: k, reason }) => {
            assert_eq!(k, key);
            assert!(reason.contains("attempt"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(
        store.tasks(&p).await,
        Err(StoreError::Corrupt { .. })
    ));
    let _: () = ::redis::cmd("HSET")
        .arg(format!("{prefix}:task:{p}:a"))
        .arg("state")
        .arg("sideways")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(matches!(
        store.task(&p, "a").await,
        Err(StoreError::Corrupt { .. })
    ));
    assert!(store
        .complete(&p, "a", &fence(&store, &p, "a").await, "h")
        .await
        .is_err());
}

/// Restarts the shared Redis while a writer keeps going: calls during the
/// outage fail with a connection error (or wait for the reconnect), the
/// store works again afterwards, and everything acknowledged before and
/// during the outage is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_keeps_data_and_the_store_recovers() {
    let ctl = require_env("DEVFLEET_SERVERS_CTL");
    let dir = require_env("DEVFLEET_SERVERS_DIR");
    let (s, _) = redis_store().await;

    let p = create(
        &s,
        vec![task("a", &[], 2), task("b", &["a"], 0), task("c", &[], 1)],
    )
    .await;
    claim_ok(&s, &p, "a", "w").await;
    assert_eq!(
        s.complete(&p, "a", &fence(&s, &p, "a").await, "h-a")
            .await
            .unwrap()
            .released,
        vec!["b"]
    );
    claim_ok(&s, &p, "b", "w").await;
    let art = s.put_artifact(b"print('kept')").await.unwrap();
    s.cache_put("ck", &art).await.unwrap();
    s.incr("before", 7).await.unwrap();
    s.kv_put("canary", "dep-1", "{\"stage\":2}", None)
        .await
        .unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut attempts, mut errors) = (0i64, 0i64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                attempts += 1;
                match s.incr("during", 1).await {
                    Ok(_) => acked += 1,
                    Err(e) => errors.push(e),
                }
                // Pacing, not waiting for an effect.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, attempts, errors)
        })
    };

    let status = within(
        "servers.sh restart redis",
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(ctl)
                .args(["restart", &dir, "redis"])
                .status()
        }),
    )
    .await
    .unwrap()
    .expect("running servers.sh");
    assert!(status.success(), "servers.sh restart redis: {status}");

    wait_for(
        "the store to answer after the restart",
        Duration::from_secs(60),
        || {
            let s = s.clone();
            async move { s.counter("before").await.ok() }
        },
    )
    .await;
    // Let the writer get a few calls through the new connection.
    let seen = s.counter("during").await.unwrap();
    wait_for("the writer to write again", Duration::from_secs(30), || {
        let s = s.clone();
        async move { (s.counter("during").await.ok()? > seen).then_some(()) }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acked, attempts, errors) = within("the writer stops", Duration::from_secs(30), writer)
        .await
        .unwrap();
    eprintln!(
        "during the restart: {attempts} writes attempted, {acked} acknowledged, {} failed",
        errors.len()
    );
    for e in &errors {
        eprintln!("  {e}");
    }
    let url = redis_url();
    let host = url.trim_start_matches("redis://").trim_end_matches('/');
    for e in &errors {
        assert!(
            matches!(e, StoreError::Connect { .. }),
            "unexpected error kind: {e}"
        );
        assert!(
            e.to_string().contains(host),
            "error does not name {host}: {e}"
        );
    }
    let during = s.counter("during").await.unwrap();
    assert!(
        acked <= during && during <= attempts,
        "acked {acked}, stored {during}, attempted {attempts}"
    );

    assert_eq!(s.counter("before").await.unwrap(), 7);
    assert_eq!(
        s.artifact(&art).await.unwrap().as_deref(),
        Some(&b"print('kept')"[..])
    );
    assert_eq!(s.cache_get("ck").await.unwrap(), Some(art));
    assert_eq!(
        s.kv_get("canary", "dep-1").await.unwrap().as_deref(),
        Some("{\"stage\":2}")
    );
    let plan = s.plan(&p).await.unwrap().unwrap();
    assert_eq!((plan.done, plan.total), (1, 3));
    assert_eq!(state(&s, &p, "a").await, TaskState::Done);
    // The lease survived: the owner renews it, the scripts reload on demand.
    assert!(s
        .renew(&p, "b", &Fence::holder("w", 1), LEASE)
        .await
        .unwrap());
    assert_eq!(drain(&s, "w2").await, vec![(p.clone(), "c".to_owned())]);
    s.complete(&p, "b", &fence(&s, &p, "b").await, "h-b")
        .await
        .unwrap();
    assert!(
        s.complete(&p, "c", &fence(&s, &p, "c").await, "h-c")
            .await
            .unwrap()
            .plan_finished
    );
}

/// Runs `servers.sh <action> <dir> redis`, waiting for it to finish.
async fn servers_ctl(action: &'static str) {
    let ctl = require_env("DEVFLEET_SERVERS_CTL");
    let dir = require_env("DEVFLEET_SERVERS_DIR");
    let status = within(
        &format!("servers.sh {action} redis"),
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(ctl)
                .args([action, &dir, "redis"])
                .status()
        }),
    )
    .await
    .unwrap()
    .expect("running servers.sh");
    assert!(status.success(), "servers.sh {action} redis: {status}");
}

/// Starts Redis again if a test that stopped it ends early (a failed
/// assertion), so later tests do not all fail for want of a server.
struct BringRedisBack {
    armed: bool,
}

impl Drop for BringRedisBack {
    fn drop(&mut self) {
        if self.armed {
            let ctl = require_env("DEVFLEET_SERVERS_CTL");
            let dir = require_env("DEVFLEET_SERVERS_DIR");
            let _ = std::process::Command::new(ctl)
                .args(["up", &dir, "redis"])
                .status();
        }
    }
}

/// Kills Redis (SIGKILL) and keeps it down: every call fails promptly with
/// a connection error naming the URL; once Redis is up again the same
/// store works and every acknowledged write is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_after_an_outage_fails_calls_cleanly_then_recovers() {
    let (s, _) = redis_store().await;
    let p = create(&s, vec![task("a", &[], 0), task("b", &["a"], 0)]).await;
    claim_ok(&s, &p, "a", "w").await;
    s.complete(&p, "a", &fence(&s, &p, "a").await, "h-a")
        .await
        .unwrap();
    s.incr("before", 3).await.unwrap();

    let mut guard = BringRedisBack { armed: true };
    servers_ctl("kill").await;
    let url = redis_url();
    let host = url.trim_start_matches("redis://").trim_end_matches('/');
    for attempt in 0..2 {
        let r = within(
            "a call while Redis is down",
            Duration::from_secs(60),
            s.incr("before", 1),
        )
        .await;
        match r {
            Err(e @ StoreError::Connect { .. }) => {
                assert!(
                    e.to_string().contains(host),
                    "error does not name {host}: {e}"
                )
            }
            other => panic!("call {attempt} while Redis is down: expected Connect, got {other:?}"),
        }
    }
    let claim = within(
        "a claim while Redis is down",
        Duration::from_secs(60),
        s.claim_next("w", LEASE),
    )
    .await;
    assert!(
        matches!(claim, Err(StoreError::Connect { .. })),
        "{claim:?}"
    );

    servers_ctl("up").await;
    guard.armed = false;
    wait_for(
        "the store to answer after Redis is back",
        Duration::from_secs(60),
        || {
            let s = s.clone();
            async move { s.counter("before").await.ok() }
        },
    )
    .await;
    assert_eq!(
        s.counter("before").await.unwrap(),
        3,
        "nothing applied while down"
    );
    assert_eq!(state(&s, &p, "a").await, TaskState::Done);
    let b = s.claim_next("w", LEASE).await.unwrap().expect("b is ready");
    assert_eq!((b.path.as_str(), b.attempt), ("b", 1));
    assert!(
        s.complete(&p, "b", &fence(&s, &p, "b").await, "h-b")
            .await
            .unwrap()
            .plan_finished
    );
}
