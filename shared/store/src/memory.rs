//! The in-memory [`TaskStore`]: the embedded mode's store and the reference
//! the Redis backend is held to.
//!
//! One `std::sync::Mutex` guards plain maps, so every method is atomic; the
//! lock is never held across an `.await`. The ready set is a `BTreeMap`
//! keyed exactly like the Redis sorted set (score from
//! `rules::ready_score`, then the sequence number taken when the task
//! became ready), and the leases are ordered by `(expiry, "<plan>|<path>")`
//! like the Redis lease set, so both backends hand out and reap tasks in
//! the same order. Nothing survives the process.
//!
//! The semantics of every transition are documented on [`TaskStore`] and
//! on [`crate::redis::RedisStore`]; `tests/conformance.rs` runs the same
//! suite against both.

use crate::rules::{
    blocked_cause, check_fence, millis, prepare_tasks, ready_score, stale, wall_ms,
};
use crate::{
    usage_label, BudgetLimits, BudgetState, ClaimOutcome, Completion, Failure, Fence, NewTask,
    PlanRecord, PlanUsage, Reservation, Spend, StoreError, StoreResult, TaskRecord, TaskState,
    TaskStore, UsageTotals,
};
use async_trait::async_trait;
use devfleet_protocol::{PlanStatus, TaskClass, Usage};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Position in the ready set: `(score, sequence)`.
type ReadyKey = (u64, u64);
/// Position in the lease set: `(expires_ms, "<plan>|<path>")`.
type LeaseKey = (i64, String);
/// plan id → path → task.
type PlanTasks = HashMap<String, BTreeMap<String, Task>>;

/// A stored task: the record plus the bookkeeping the record does not show.
#[derive(Debug, Clone)]
struct Task {
    rec: TaskRecord,
    /// Dependencies not yet Done.
    pending: u32,
    /// Where the task sits in the ready set, while it is Ready.
    ready_key: Option<ReadyKey>,
}

#[derive(Debug, Default)]
struct Inner {
    plans: HashMap<String, PlanRecord>,
    tasks: PlanTasks,
    ready: BTreeMap<ReadyKey, (String, String)>,
    leases: BTreeMap<LeaseKey, (String, String)>,
    seq: u64,
    cache: HashMap<String, String>,
    artifacts: HashMap<String, Vec<u8>>,
    counters: HashMap<String, i64>,
    /// Token buckets: tokens and when they were counted (store clock).
    buckets: HashMap<String, (f64, i64)>,
    kv: HashMap<String, BTreeMap<String, KvEntry>>,
    /// When each cache entry and artifact was last written (retention).
    cache_written: HashMap<String, i64>,
    artifact_written: HashMap<String, i64>,
    /// `(plan, "<attempt>|<path>")` of every executor run whose usage is
    /// recorded (idempotence of `record_usage`).
    usage_runs: HashSet<(String, String)>,
    usage: HashMap<String, PlanUsage>,
    usage_models: BTreeMap<String, UsageTotals>,
    budgets: HashMap<String, Budget>,
}

/// A plan's budget: limits, spend, and reservations by run.
#[derive(Debug, Default)]
struct Budget {
    limits: Option<BudgetLimits>,
    spent: Spend,
    reserved: Spend,
    /// `"<attempt>|<path>"` → what that run reserved.
    runs: HashMap<String, Spend>,
}

#[derive(Debug, Clone)]
struct KvEntry {
    value: String,
    /// Expired once the wall clock reaches this.
    expires_ms: Option<i64>,
}

impl KvEntry {
    fn live(&self, now: i64) -> bool {
        self.expires_ms.is_none_or(|e| e > now)
    }
}

/// The in-memory task store. Cheap to create; share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// Added to this machine's clock to make the store's clock (lease
    /// times); zero unless a test moved it.
    skew_ms: AtomicI64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the store's clock (lease times) forward by `by`: for tests of
    /// expiry.
    pub fn advance_clock(&self, by: Duration) {
        self.skew_ms.fetch_add(millis(by), Ordering::SeqCst);
    }

    /// The store's clock: lease times are taken from it.
    fn now(&self) -> i64 {
        wall_ms().saturating_add(self.skew_ms.load(Ordering::SeqCst))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No code path panics while holding the lock (no unwraps, no
        // indexing that can fail); should one ever, keep serving instead of
        // turning every later call into a panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A plan's tasks and record, or the error naming what is missing.
fn plan_of<'a>(
    tasks: &'a mut PlanTasks,
    plans: &'a mut HashMap<String, PlanRecord>,
    plan_id: &str,
    path: &str,
) -> StoreResult<(&'a mut BTreeMap<String, Task>, &'a mut PlanRecord)> {
    let map = tasks
        .get_mut(plan_id)
        .ok_or_else(|| unknown_task(plan_id, path))?;
    let plan = plans
        .get_mut(plan_id)
        .ok_or_else(|| StoreError::UnknownPlan {
            plan_id: plan_id.to_owned(),
        })?;
    Ok((map, plan))
}

fn unknown_task(plan_id: &str, path: &str) -> StoreError {
    StoreError::UnknownTask {
        plan_id: plan_id.to_owned(),
        path: path.to_owned(),
    }
}

fn invalid_state(
    plan_id: &str,
    path: &str,
    state: TaskState,
    operation: &'static str,
) -> StoreError {
    StoreError::InvalidState {
        plan_id: plan_id.to_owned(),
        path: path.to_owned(),
        state,
        operation,
    }
}

fn lease_member(plan_id: &str, path: &str) -> String {
    format!("{plan_id}|{path}")
}

fn plan_finished(p: &PlanRecord) -> bool {
    p.done + p.failed + p.blocked == p.total
}

/// The parts of [`Inner`] a transition works on, borrowed separately.
struct Sets<'a> {
    ready: &'a mut BTreeMap<ReadyKey, (String, String)>,
    leases: &'a mut BTreeMap<LeaseKey, (String, String)>,
    seq: &'a mut u64,
    budgets: &'a mut HashMap<String, Budget>,
}

impl Sets<'_> {
    /// Puts a task at the back of its (class, priority) band.
    fn make_ready(&mut self, t: &mut Task, class: TaskClass) {
        self.leave_ready(t);
        *self.seq += 1;
        let key = (ready_score(class, t.rec.priority), *self.seq);
        self.ready
            .insert(key, (t.rec.plan_id.clone(), t.rec.path.clone()));
        t.ready_key = Some(key);
        t.rec.state = TaskState::Ready;
        t.rec.class = class;
    }

    fn leave_ready(&mut self, t: &mut Task) {
        if let Some(key) = t.ready_key.take() {
            self.ready.remove(&key);
        }
    }

    /// Releases what attempt `attempt` of a task reserved of its plan's
    /// budget, when its run ended without `record_usage` (the worker died
    /// or lost its lease). `redis/common.lua` mirrors it.
    fn release_reservation(&mut self, plan_id: &str, path: &str, attempt: u32) {
        let Some(budget) = self.budgets.get_mut(plan_id) else {
            return;
        };
        if let Some(held) = budget.runs.remove(&format!("{attempt}|{path}")) {
            budget.reserved.tokens = budget.reserved.tokens.saturating_sub(held.tokens);
            budget.reserved.cost_nusd = budget.reserved.cost_nusd.saturating_sub(held.cost_nusd);
        }
    }

    fn drop_lease(&mut self, t: &mut Task) {
        if let Some(exp) = t.rec.lease_expires_ms.take() {
            self.leases
                .remove(&(exp, lease_member(&t.rec.plan_id, &t.rec.path)));
        }
        t.rec.lease_owner = None;
    }

    /// Leases a task to `owner` until `expires`; a fresh lease starts a new
    /// attempt (the previous attempt's budget reservation, if its run
    /// never reconciled it, is released), a re-claim or handoff keeps it.
    fn lease(&mut self, t: &mut Task, owner: &str, expires: i64, now: i64, fresh: bool) {
        self.drop_lease(t);
        t.rec.state = TaskState::Leased;
        t.rec.lease_owner = Some(owner.to_owned());
        t.rec.lease_expires_ms = Some(expires);
        t.rec.updated_ms = now;
        if fresh {
            self.release_reservation(&t.rec.plan_id, &t.rec.path, t.rec.attempt);
            t.rec.attempt = t.rec.attempt.saturating_add(1);
        }
        self.leases.insert(
            (expires, lease_member(&t.rec.plan_id, &t.rec.path)),
            (t.rec.plan_id.clone(), t.rec.path.clone()),
        );
    }
}

impl Inner {
    fn split(&mut self) -> (&mut PlanTasks, &mut HashMap<String, PlanRecord>, Sets<'_>) {
        (
            &mut self.tasks,
            &mut self.plans,
            Sets {
                ready: &mut self.ready,
                leases: &mut self.leases,
                seq: &mut self.seq,
                budgets: &mut self.budgets,
            },
        )
    }

    fn kv_prune(&mut self, collection: &str, key: &str, now: i64) {
        if let Some(c) = self.kv.get_mut(collection) {
            if c.get(key).is_some_and(|e| !e.live(now)) {
                c.remove(key);
            }
        }
    }
}

fn state_of(tasks: &BTreeMap<String, Task>, path: &str) -> Option<TaskState> {
    tasks.get(path).map(|t| t.rec.state)
}

#[async_trait]
impl TaskStore for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn create_plan(&self, plan: PlanRecord, tasks: Vec<NewTask>) -> StoreResult<bool> {
        let prepared = prepare_tasks(&plan.id, tasks)?;
        let mut inner = self.lock();
        if inner.plans.contains_key(&plan.id) {
            return Ok(false);
        }
        let (all_tasks, plans, mut sets) = inner.split();
        let mut plan = plan;
        plan.total = u32::try_from(prepared.len()).unwrap_or(u32::MAX);
        plan.done = 0;
        plan.failed = 0;
        plan.blocked = 0;
        let mut map = BTreeMap::new();
        let mut order = Vec::with_capacity(prepared.len());
        for p in prepared {
            let rec = TaskRecord {
                plan_id: plan.id.clone(),
                path: p.task.path.clone(),
                spec: p.task.spec,
                content: p.task.content,
                depends_on: p.task.depends_on,
                dependents: p.dependents,
                priority: p.task.priority,
                estimate: p.task.estimate,
                executor: p.task.executor,
                state: TaskState::Pending,
                class: TaskClass::New,
                attempt: 0,
                lease_owner: None,
                lease_expires_ms: None,
                artifact: None,
                error: None,
                updated_ms: plan.created_ms,
            };
            order.push((p.task.path.clone(), p.pending));
            map.insert(
                p.task.path,
                Task {
                    rec,
                    pending: p.pending,
                    ready_key: None,
                },
            );
        }
        // Tasks with no dependencies enter the ready set in plan order.
        for (path, pending) in order {
            if pending == 0 {
                if let Some(t) = map.get_mut(&path) {
                    sets.make_ready(t, TaskClass::New);
                }
            }
        }
        all_tasks.insert(plan.id.clone(), map);
        plans.insert(plan.id.clone(), plan);
        Ok(true)
    }

    async fn plan(&self, plan_id: &str) -> StoreResult<Option<PlanRecord>> {
        Ok(self.lock().plans.get(plan_id).cloned())
    }

    async fn plans(&self) -> StoreResult<Vec<PlanRecord>> {
        let mut all: Vec<PlanRecord> = self.lock().plans.values().cloned().collect();
        // Newest first; equal times by id, descending (as Redis ZREVRANGE).
        all.sort_by(|a, b| {
            b.created_ms
                .cmp(&a.created_ms)
                .then_with(|| b.id.cmp(&a.id))
        });
        Ok(all)
    }

    async fn set_plan_status(
        &self,
        plan_id: &str,
        status: PlanStatus,
        message: Option<String>,
    ) -> StoreResult<()> {
        let mut inner = self.lock();
        let plan = inner
            .plans
            .get_mut(plan_id)
            .ok_or_else(|| StoreError::UnknownPlan {
                plan_id: plan_id.to_owned(),
            })?;
        plan.status = status;
        plan.message = message;
        plan.updated_ms = wall_ms();
        Ok(())
    }

    async fn task(&self, plan_id: &str, path: &str) -> StoreResult<Option<TaskRecord>> {
        Ok(self
            .lock()
            .tasks
            .get(plan_id)
            .and_then(|m| m.get(path))
            .map(|t| t.rec.clone()))
    }

    async fn tasks(&self, plan_id: &str) -> StoreResult<Vec<TaskRecord>> {
        let inner = self.lock();
        let map = inner
            .tasks
            .get(plan_id)
            .ok_or_else(|| StoreError::UnknownPlan {
                plan_id: plan_id.to_owned(),
            })?;
        Ok(map.values().map(|t| t.rec.clone()).collect())
    }

    async fn ready_len(&self) -> StoreResult<u64> {
        Ok(self.lock().ready.len() as u64)
    }

    async fn claim_next(&self, owner: &str, lease: Duration) -> StoreResult<Option<TaskRecord>> {
        let now_ms = self.now();
        let mut inner = self.lock();
        let (tasks, plans, mut sets) = inner.split();
        // Members of plans whose budget is exhausted stay where they are.
        let mut after: Option<ReadyKey> = None;
        let mut scanned = 0usize;
        loop {
            let next = match after {
                None => sets.ready.first_key_value().map(|(k, _)| *k),
                Some(a) => sets
                    .ready
                    .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .next()
                    .map(|(k, _)| *k),
            };
            let Some(key) = next else { break };
            let held = sets.ready.get(&key).is_some_and(|(plan_id, _)| {
                plans
                    .get(plan_id)
                    .is_some_and(|p| p.status == PlanStatus::BudgetExhausted)
            });
            if held {
                scanned += 1;
                if scanned >= crate::rules::MAX_HELD_SCAN {
                    break;
                }
                after = Some(key);
                continue;
            }
            let Some((plan_id, path)) = sets.ready.remove(&key) else {
                break;
            };
            let (score, seq) = key;
            let Some(t) = tasks.get_mut(&plan_id).and_then(|m| m.get_mut(&path)) else {
                continue;
            };
            if t.rec.state != TaskState::Ready || t.ready_key != Some((score, seq)) {
                continue;
            }
            t.ready_key = None;
            sets.lease(t, owner, now_ms.saturating_add(millis(lease)), now_ms, true);
            return Ok(Some(t.rec.clone()));
        }
        Ok(None)
    }

    async fn claim(
        &self,
        plan_id: &str,
        path: &str,
        owner: &str,
        handoff_from: Option<&str>,
        lease: Duration,
    ) -> StoreResult<ClaimOutcome> {
        let now_ms = self.now();
        let mut inner = self.lock();
        let (tasks, _, mut sets) = inner.split();
        let t = tasks
            .get_mut(plan_id)
            .and_then(|m| m.get_mut(path))
            .ok_or_else(|| unknown_task(plan_id, path))?;
        let expires = now_ms.saturating_add(millis(lease));
        match t.rec.state {
            TaskState::Ready => {
                sets.leave_ready(t);
                sets.lease(t, owner, expires, now_ms, true);
            }
            TaskState::Leased => {
                let current = t.rec.lease_owner.clone().unwrap_or_default();
                let current_exp = t.rec.lease_expires_ms.unwrap_or(i64::MIN);
                if current == owner || handoff_from == Some(current.as_str()) {
                    sets.lease(t, owner, expires, now_ms, false);
                } else if current_exp < now_ms {
                    sets.lease(t, owner, expires, now_ms, true);
                } else {
                    return Ok(ClaimOutcome::Held {
                        owner: current,
                        expires_ms: current_exp,
                    });
                }
            }
            other => return Ok(ClaimOutcome::NotClaimable(other)),
        }
        Ok(ClaimOutcome::Claimed(t.rec.clone()))
    }

    async fn renew(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        lease: Duration,
    ) -> StoreResult<bool> {
        let now_ms = self.now();
        let mut inner = self.lock();
        let (tasks, _, mut sets) = inner.split();
        let t = tasks
            .get_mut(plan_id)
            .and_then(|m| m.get_mut(path))
            .ok_or_else(|| unknown_task(plan_id, path))?;
        let Some(owner) = fence.owner.as_deref() else {
            return Ok(false);
        };
        let holds = t.rec.state == TaskState::Leased
            && t.rec.attempt == fence.attempt
            && t.rec.lease_owner.as_deref() == Some(owner)
            && t.rec.lease_expires_ms.is_some_and(|e| e >= now_ms);
        if !holds {
            return Ok(false);
        }
        sets.lease(
            t,
            owner,
            now_ms.saturating_add(millis(lease)),
            now_ms,
            false,
        );
        Ok(true)
    }

    async fn reap_expired(&self) -> StoreResult<Vec<(String, String)>> {
        let now_ms = self.now();
        let mut inner = self.lock();
        let (tasks, _, mut sets) = inner.split();
        let expired: Vec<(LeaseKey, (String, String))> = sets
            .leases
            .range(..(now_ms, String::new()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut reaped = Vec::with_capacity(expired.len());
        for (key, (plan_id, path)) in expired {
            sets.leases.remove(&key);
            let Some(t) = tasks.get_mut(&plan_id).and_then(|m| m.get_mut(&path)) else {
                continue;
            };
            if t.rec.state != TaskState::Leased {
                continue;
            }
            t.rec.lease_owner = None;
            t.rec.lease_expires_ms = None;
            t.rec.updated_ms = now_ms;
            sets.release_reservation(&plan_id, &path, t.rec.attempt);
            let class = t.rec.class;
            sets.make_ready(t, class);
            reaped.push((plan_id, path));
        }
        Ok(reaped)
    }

    async fn mark_built(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        artifact: &str,
    ) -> StoreResult<()> {
        let mut inner = self.lock();
        let (tasks, _, mut sets) = inner.split();
        let t = tasks
            .get_mut(plan_id)
            .and_then(|m| m.get_mut(path))
            .ok_or_else(|| unknown_task(plan_id, path))?;
        check_fence(&t.rec, fence)?;
        match t.rec.state {
            TaskState::Leased if fence.owner.is_some() => {
                sets.drop_lease(t);
                t.rec.state = TaskState::Built;
                t.rec.artifact = Some(artifact.to_owned());
                t.rec.updated_ms = wall_ms();
                Ok(())
            }
            TaskState::Built if t.rec.artifact.as_deref() == Some(artifact) => Ok(()),
            TaskState::Done => Ok(()),
            TaskState::Leased | TaskState::Built | TaskState::Ready => Err(stale(&t.rec, fence)),
            other => Err(invalid_state(plan_id, path, other, "mark it built")),
        }
    }

    async fn requeue(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        class: TaskClass,
        error: Option<String>,
    ) -> StoreResult<()> {
        let mut inner = self.lock();
        let (tasks, _, mut sets) = inner.split();
        let t = tasks
            .get_mut(plan_id)
            .and_then(|m| m.get_mut(path))
            .ok_or_else(|| unknown_task(plan_id, path))?;
        check_fence(&t.rec, fence)?;
        match t.rec.state {
            TaskState::Leased | TaskState::Built | TaskState::Ready => {
                sets.drop_lease(t);
                t.rec.error = error;
                t.rec.updated_ms = wall_ms();
                sets.make_ready(t, class);
                Ok(())
            }
            other => Err(invalid_state(plan_id, path, other, "requeue it")),
        }
    }

    async fn complete(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        artifact: &str,
    ) -> StoreResult<Completion> {
        let mut inner = self.lock();
        let (tasks, plans, mut sets) = inner.split();
        let (map, plan) = plan_of(tasks, plans, plan_id, path)?;
        let t = map
            .get_mut(path)
            .ok_or_else(|| unknown_task(plan_id, path))?;
        check_fence(&t.rec, fence)?;
        match t.rec.state {
            TaskState::Done => {
                return Ok(Completion {
                    newly_done: false,
                    released: Vec::new(),
                    done: plan.done,
                    total: plan.total,
                    plan_finished: plan_finished(plan),
                })
            }
            TaskState::Leased | TaskState::Built => {}
            other => return Err(invalid_state(plan_id, path, other, "complete it")),
        }
        let now = wall_ms();
        sets.drop_lease(t);
        t.rec.state = TaskState::Done;
        t.rec.artifact = Some(artifact.to_owned());
        t.rec.error = None;
        t.rec.updated_ms = now;
        let dependents = t.rec.dependents.clone();
        let mut released = Vec::new();
        for d in dependents {
            let Some(dt) = map.get_mut(&d) else { continue };
            dt.pending = dt.pending.saturating_sub(1);
            if dt.pending == 0 && dt.rec.state == TaskState::Pending {
                dt.rec.updated_ms = now;
                sets.make_ready(dt, TaskClass::New);
                released.push(d);
            }
        }
        released.sort();
        plan.done += 1;
        plan.updated_ms = now;
        Ok(Completion {
            newly_done: true,
            released,
            done: plan.done,
            total: plan.total,
            plan_finished: plan_finished(plan),
        })
    }

    async fn fail(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        error: &str,
    ) -> StoreResult<Failure> {
        let mut inner = self.lock();
        let (tasks, plans, mut sets) = inner.split();
        let (map, plan) = plan_of(tasks, plans, plan_id, path)?;
        let t = map
            .get_mut(path)
            .ok_or_else(|| unknown_task(plan_id, path))?;
        check_fence(&t.rec, fence)?;
        match t.rec.state {
            TaskState::Failed => {
                return Ok(Failure {
                    newly_failed: false,
                    blocked: Vec::new(),
                    plan_finished: plan_finished(plan),
                })
            }
            TaskState::Done | TaskState::Blocked => {
                return Err(invalid_state(plan_id, path, t.rec.state, "fail it"))
            }
            _ => {}
        }
        let now = wall_ms();
        sets.leave_ready(t);
        sets.drop_lease(t);
        t.rec.state = TaskState::Failed;
        t.rec.error = Some(error.to_owned());
        t.rec.updated_ms = now;
        let cause = blocked_cause(path, error);
        // Breadth-first over dependents, marking every one not yet final.
        let mut queue: Vec<String> = t.rec.dependents.clone();
        let mut seen = HashSet::new();
        let mut blocked = Vec::new();
        let mut i = 0;
        while i < queue.len() {
            let d = queue[i].clone();
            i += 1;
            if !seen.insert(d.clone()) {
                continue;
            }
            let Some(dt) = map.get_mut(&d) else { continue };
            if !dt.rec.state.is_final() {
                sets.leave_ready(dt);
                sets.drop_lease(dt);
                dt.rec.state = TaskState::Blocked;
                dt.rec.error = Some(cause.clone());
                dt.rec.updated_ms = now;
                blocked.push(d);
            }
            queue.extend(dt.rec.dependents.iter().cloned());
        }
        blocked.sort();
        plan.failed += 1;
        plan.blocked += u32::try_from(blocked.len()).unwrap_or(u32::MAX);
        plan.updated_ms = now;
        Ok(Failure {
            newly_failed: true,
            blocked,
            plan_finished: plan_finished(plan),
        })
    }

    async fn replay(&self, plan_id: &str, path: &str) -> StoreResult<()> {
        let mut inner = self.lock();
        let (tasks, plans, mut sets) = inner.split();
        let (map, plan) = plan_of(tasks, plans, plan_id, path)?;
        let state = state_of(map, path).ok_or_else(|| unknown_task(plan_id, path))?;
        if state != TaskState::Failed {
            return Err(invalid_state(plan_id, path, state, "replay it"));
        }
        let now = wall_ms();
        // A dependency that is itself failed or blocked keeps this task
        // blocked: it cannot run until that one is replayed.
        let (deps, dependents) = match map.get(path) {
            Some(t) => (t.rec.depends_on.clone(), t.rec.dependents.clone()),
            None => return Err(unknown_task(plan_id, path)),
        };
        let bad_dep = deps.iter().find_map(|d| {
            let dt = map.get(d)?;
            match dt.rec.state {
                TaskState::Failed => Some(blocked_cause(d, dt.rec.error.as_deref().unwrap_or(""))),
                TaskState::Blocked => Some(dt.rec.error.clone().unwrap_or_default()),
                _ => None,
            }
        });
        plan.failed = plan.failed.saturating_sub(1);
        plan.updated_ms = now;
        let Some(t) = map.get_mut(path) else {
            return Err(unknown_task(plan_id, path));
        };
        t.rec.attempt = 0;
        t.rec.updated_ms = now;
        if let Some(cause) = bad_dep {
            t.rec.state = TaskState::Blocked;
            t.rec.error = Some(cause);
            plan.blocked += 1;
            return Ok(());
        }
        t.rec.error = None;
        if t.pending == 0 {
            sets.make_ready(t, TaskClass::New);
        } else {
            t.rec.state = TaskState::Pending;
        }
        // Blocked tasks downstream, in breadth-first order.
        let mut closure = Vec::new();
        let mut queue = dependents;
        let mut seen = HashSet::new();
        let mut i = 0;
        while i < queue.len() {
            let d = queue[i].clone();
            i += 1;
            if !seen.insert(d.clone()) {
                continue;
            }
            let Some(dt) = map.get(&d) else { continue };
            if dt.rec.state == TaskState::Blocked {
                closure.push(d);
            }
            queue.extend(dt.rec.dependents.iter().cloned());
        }
        // Unblock, until nothing changes, each blocked task none of whose
        // direct dependencies is failed or blocked.
        let mut unblocked = 0u32;
        loop {
            let mut changed = false;
            for d in &closure {
                let Some(dt) = map.get(d) else { continue };
                if dt.rec.state != TaskState::Blocked {
                    continue;
                }
                let clear = dt.rec.depends_on.iter().all(|dep| {
                    !matches!(
                        state_of(map, dep),
                        Some(TaskState::Failed | TaskState::Blocked)
                    )
                });
                if !clear {
                    continue;
                }
                let Some(dt) = map.get_mut(d) else { continue };
                dt.rec.attempt = 0;
                dt.rec.error = None;
                dt.rec.updated_ms = now;
                if dt.pending == 0 {
                    sets.make_ready(dt, TaskClass::New);
                } else {
                    dt.rec.state = TaskState::Pending;
                }
                unblocked += 1;
                changed = true;
            }
            if !changed {
                break;
            }
        }
        plan.blocked = plan.blocked.saturating_sub(unblocked);
        Ok(())
    }

    async fn cache_get(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self.lock().cache.get(key).cloned())
    }

    async fn cache_put(&self, key: &str, artifact: &str) -> StoreResult<()> {
        let mut inner = self.lock();
        inner.cache.insert(key.to_owned(), artifact.to_owned());
        inner.cache_written.insert(key.to_owned(), wall_ms());
        Ok(())
    }

    async fn put_artifact(&self, bytes: &[u8]) -> StoreResult<String> {
        let hash = crate::content_hash(bytes);
        let mut inner = self.lock();
        inner
            .artifacts
            .entry(hash.clone())
            .or_insert_with(|| bytes.to_vec());
        inner.artifact_written.insert(hash.clone(), wall_ms());
        Ok(hash)
    }

    async fn artifact(&self, hash: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.lock().artifacts.get(hash).cloned())
    }

    async fn incr(&self, counter: &str, by: i64) -> StoreResult<i64> {
        let mut inner = self.lock();
        let v = inner.counters.entry(counter.to_owned()).or_insert(0);
        *v = v.checked_add(by).ok_or_else(|| {
            StoreError::Backend(format!("counter '{counter}' would overflow adding {by}"))
        })?;
        Ok(*v)
    }

    async fn counter(&self, counter: &str) -> StoreResult<i64> {
        Ok(self.lock().counters.get(counter).copied().unwrap_or(0))
    }

    async fn token_bucket(
        &self,
        bucket: &str,
        rate: crate::BucketRate,
        step: crate::BucketStep,
    ) -> StoreResult<Option<Duration>> {
        let now = self.now();
        let mut inner = self.lock();
        let state = inner.buckets.get(bucket).copied();
        let (next, wait) = crate::rules::token_bucket_step(state, now, rate, step);
        inner.buckets.insert(bucket.to_owned(), next);
        Ok(wait)
    }

    async fn kv_put(
        &self,
        collection: &str,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<()> {
        let expires_ms = ttl.map(|d| wall_ms().saturating_add(millis(d)));
        self.lock()
            .kv
            .entry(collection.to_owned())
            .or_default()
            .insert(
                key.to_owned(),
                KvEntry {
                    value: value.to_owned(),
                    expires_ms,
                },
            );
        Ok(())
    }

    async fn kv_put_new(&self, collection: &str, key: &str, value: &str) -> StoreResult<bool> {
        let mut inner = self.lock();
        inner.kv_prune(collection, key, wall_ms());
        let c = inner.kv.entry(collection.to_owned()).or_default();
        if c.contains_key(key) {
            return Ok(false);
        }
        c.insert(
            key.to_owned(),
            KvEntry {
                value: value.to_owned(),
                expires_ms: None,
            },
        );
        Ok(true)
    }

    async fn kv_get(&self, collection: &str, key: &str) -> StoreResult<Option<String>> {
        let mut inner = self.lock();
        inner.kv_prune(collection, key, wall_ms());
        Ok(inner
            .kv
            .get(collection)
            .and_then(|c| c.get(key))
            .map(|e| e.value.clone()))
    }

    async fn kv_delete(&self, collection: &str, key: &str) -> StoreResult<bool> {
        let mut inner = self.lock();
        inner.kv_prune(collection, key, wall_ms());
        Ok(inner
            .kv
            .get_mut(collection)
            .is_some_and(|c| c.remove(key).is_some()))
    }

    async fn kv_list(&self, collection: &str) -> StoreResult<Vec<(String, String)>> {
        let now = wall_ms();
        let mut inner = self.lock();
        let Some(c) = inner.kv.get_mut(collection) else {
            return Ok(Vec::new());
        };
        c.retain(|_, e| e.live(now));
        Ok(c.iter()
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect())
    }

    // Compare-and-delete and retention.

    async fn kv_delete_if(&self, collection: &str, key: &str, value: &str) -> StoreResult<bool> {
        let mut inner = self.lock();
        inner.kv_prune(collection, key, wall_ms());
        let Some(c) = inner.kv.get_mut(collection) else {
            return Ok(false);
        };
        if c.get(key).is_some_and(|e| e.value == value) {
            c.remove(key);
            return Ok(true);
        }
        Ok(false)
    }

    async fn delete_plan(&self, plan_id: &str, before_ms: i64) -> StoreResult<bool> {
        let mut inner = self.lock();
        let eligible = inner
            .plans
            .get(plan_id)
            .is_some_and(|p| p.status.is_final() && p.updated_ms < before_ms);
        if !eligible {
            return Ok(false);
        }
        inner.plans.remove(plan_id);
        inner.usage.remove(plan_id);
        inner.budgets.remove(plan_id);
        inner.usage_runs.retain(|(p, _)| p != plan_id);
        let tasks = inner.tasks.remove(plan_id).unwrap_or_default();
        for task in tasks.values() {
            if let Some(k) = task.ready_key {
                inner.ready.remove(&k);
            }
            if let Some(expires) = task.rec.lease_expires_ms {
                inner
                    .leases
                    .remove(&(expires, lease_member(plan_id, &task.rec.path)));
            }
        }
        Ok(true)
    }

    async fn cache_entries(&self) -> StoreResult<Vec<crate::CacheEntry>> {
        let inner = self.lock();
        let mut all: Vec<crate::CacheEntry> = inner
            .cache_written
            .iter()
            .filter_map(|(key, &written_ms)| {
                inner.cache.get(key).map(|artifact| crate::CacheEntry {
                    key: key.clone(),
                    artifact: artifact.clone(),
                    written_ms,
                })
            })
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn cache_delete(&self, key: &str, before_ms: i64) -> StoreResult<bool> {
        let mut inner = self.lock();
        if inner.cache_written.get(key).is_none_or(|&w| w >= before_ms) {
            return Ok(false);
        }
        inner.cache_written.remove(key);
        Ok(inner.cache.remove(key).is_some())
    }

    async fn artifact_hashes(&self) -> StoreResult<Vec<(String, i64)>> {
        let inner = self.lock();
        let mut all: Vec<(String, i64)> = inner
            .artifact_written
            .iter()
            .filter(|(hash, _)| inner.artifacts.contains_key(*hash))
            .map(|(hash, &written)| (hash.clone(), written))
            .collect();
        all.sort();
        Ok(all)
    }

    async fn delete_artifact(&self, hash: &str, before_ms: i64) -> StoreResult<bool> {
        let mut inner = self.lock();
        if inner
            .artifact_written
            .get(hash)
            .is_none_or(|&w| w >= before_ms)
        {
            return Ok(false);
        }
        inner.artifact_written.remove(hash);
        Ok(inner.artifacts.remove(hash).is_some())
    }

    async fn record_usage(
        &self,
        plan_id: &str,
        path: &str,
        attempt: u32,
        usage: &[Usage],
    ) -> StoreResult<bool> {
        let mut inner = self.lock();
        if !inner.plans.contains_key(plan_id) {
            return Err(StoreError::UnknownPlan {
                plan_id: plan_id.to_owned(),
            });
        }
        let run = format!("{attempt}|{path}");
        inner.split().2.release_reservation(plan_id, path, attempt);
        if !inner.usage_runs.insert((plan_id.to_owned(), run)) {
            return Ok(false);
        }
        let Inner {
            usage: plans,
            usage_models,
            budgets,
            ..
        } = &mut *inner;
        let plan = plans.entry(plan_id.to_owned()).or_default();
        let budget = budgets.entry(plan_id.to_owned()).or_default();
        for u in usage {
            let spend = Spend::of(&UsageTotals::of(u));
            budget.spent.tokens = budget.spent.tokens.saturating_add(spend.tokens);
            budget.spent.cost_nusd = budget.spent.cost_nusd.saturating_add(spend.cost_nusd);
            let one = UsageTotals::of(u);
            let label = usage_label(u);
            plan.total.add(&one);
            plan.by_model.entry(label.clone()).or_default().add(&one);
            plan.by_task.entry(path.to_owned()).or_default().add(&one);
            usage_models.entry(label).or_default().add(&one);
        }
        Ok(true)
    }

    async fn plan_usage(&self, plan_id: &str) -> StoreResult<PlanUsage> {
        Ok(self.lock().usage.get(plan_id).cloned().unwrap_or_default())
    }

    async fn usage_by_model(&self) -> StoreResult<BTreeMap<String, UsageTotals>> {
        Ok(self.lock().usage_models.clone())
    }

    async fn set_budget(&self, plan_id: &str, limits: BudgetLimits) -> StoreResult<()> {
        let mut inner = self.lock();
        inner.budgets.entry(plan_id.to_owned()).or_default().limits = Some(limits);
        Ok(())
    }

    async fn budget(&self, plan_id: &str) -> StoreResult<BudgetState> {
        Ok(self
            .lock()
            .budgets
            .get(plan_id)
            .map(|b| BudgetState {
                limits: b.limits,
                spent: b.spent,
                reserved: b.reserved,
            })
            .unwrap_or_default())
    }

    async fn reserve_budget(
        &self,
        plan_id: &str,
        path: &str,
        attempt: u32,
        expected: Spend,
        default: BudgetLimits,
    ) -> StoreResult<Reservation> {
        let mut inner = self.lock();
        if !inner.plans.contains_key(plan_id) {
            return Err(StoreError::UnknownPlan {
                plan_id: plan_id.to_owned(),
            });
        }
        let budget = inner.budgets.entry(plan_id.to_owned()).or_default();
        let limits = budget.limits.unwrap_or(default);
        let run = format!("{attempt}|{path}");
        if limits.is_unlimited() || budget.runs.contains_key(&run) {
            return Ok(Reservation::Granted);
        }
        let used = Spend {
            tokens: budget.spent.tokens.saturating_add(budget.reserved.tokens),
            cost_nusd: budget
                .spent
                .cost_nusd
                .saturating_add(budget.reserved.cost_nusd),
        };
        if !limits.covers(used, expected) {
            return Ok(Reservation::Exhausted {
                limits,
                spent: budget.spent,
                reserved: budget.reserved,
            });
        }
        budget.reserved.tokens = budget.reserved.tokens.saturating_add(expected.tokens);
        budget.reserved.cost_nusd = budget.reserved.cost_nusd.saturating_add(expected.cost_nusd);
        budget.runs.insert(run, expected);
        Ok(Reservation::Granted)
    }
}
