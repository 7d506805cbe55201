//! The devfleet task store: plans, tasks and their states, the priority
//! ready set, leases, the result cache, artifacts, counters and small
//! key/value records (canary state, breaker state, the DLQ index).
//!
//! Two backends implement [`TaskStore`]: [`redis::RedisStore`] (every
//! multi-key transition is one Lua script, so it is atomic across any
//! number of schedulers and workers) and [`memory::MemoryStore`] (one mutex,
//! for the embedded mode). Both pass `tests/conformance.rs`.
//!
//! # Invariants
//!
//! * A task is in the ready set iff its state is [`TaskState::Ready`].
//! * Ready order: class ([`TaskClass::Fix`] first), then priority (higher
//!   first), then FIFO by the time it became ready.
//! * A task is [`TaskState::Leased`] by exactly one owner until the lease
//!   expires; [`TaskStore::reap_expired`] returns expired ones to Ready.
//! * Every write about a claim's work carries its [`Fence`] (attempt, and
//!   owner for the lease holder); a write whose fence is not the task's
//!   current claim fails with [`StoreError::StaleClaim`] and changes
//!   nothing, so a worker paused past its lease cannot overwrite the work
//!   of the one that took the task over.
//! * Lease times are the store's clock (Redis `TIME`; the memory store's
//!   own), never a caller's, so hosts with skewed clocks agree on expiry.
//! * Transitions are idempotent: completing a Done task, or failing a
//!   Failed one, changes nothing and says so.
//! * When a task completes, each dependent whose last unfinished dependency
//!   it was becomes Ready in the same atomic step.

use async_trait::async_trait;
use devfleet_protocol::{PlanStatus, TaskClass, Usage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub mod extra_files;
pub mod memory;
pub mod redis;
mod rules;
pub mod snapshot;

/// Result type of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// What went wrong in the store. Variants name the plan, task or key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store URL '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot reach the store at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("store backend error: {0}")]
    Backend(String),
    #[error("plan '{plan_id}' does not exist")]
    UnknownPlan { plan_id: String },
    #[error("task '{path}' of plan '{plan_id}' does not exist")]
    UnknownTask { plan_id: String, path: String },
    #[error("plan '{plan_id}': task '{path}' depends on '{dependency}', which is not in the plan")]
    UnknownDependency {
        plan_id: String,
        path: String,
        dependency: String,
    },
    #[error("corrupt record at '{key}': {reason}")]
    Corrupt { key: String, reason: String },
    /// Plan ids become part of store keys, so they must be non-empty and
    /// free of `:`, `|` and whitespace.
    #[error("invalid plan id '{plan_id}': {reason}")]
    InvalidPlanId { plan_id: String, reason: String },
    /// Two tasks of one plan share a path.
    #[error("plan '{plan_id}': task path '{path}' appears more than once")]
    DuplicateTask { plan_id: String, path: String },
    /// The transition does not apply to the task's current state (for
    /// example completing a Pending task).
    #[error("task '{path}' of plan '{plan_id}' is {}: cannot {operation}", state.as_str())]
    InvalidState {
        plan_id: String,
        path: String,
        state: TaskState,
        operation: &'static str,
    },
    /// A write carried the fence of a claim that is no longer the task's
    /// current one (another attempt, or the lease passed to someone else):
    /// nothing changed. Callers treat it as "someone else owns this now".
    #[error(
        "task '{path}' of plan '{plan_id}': the claim of attempt {attempt}{} is stale \
         (the task is {} at attempt {current_attempt}{})",
        owner.as_deref().map(|o| format!(" by {o}")).unwrap_or_default(),
        state.as_str(),
        current_owner.as_deref().map(|o| format!(", leased by {o}")).unwrap_or_default()
    )]
    StaleClaim {
        plan_id: String,
        path: String,
        /// The fence the write carried.
        attempt: u32,
        owner: Option<String>,
        /// The task as it is.
        state: TaskState,
        current_attempt: u32,
        current_owner: Option<String>,
    },
}

impl StoreError {
    /// True for [`StoreError::StaleClaim`]: the write was about an attempt
    /// that is over, and the caller should drop it.
    pub fn is_stale(&self) -> bool {
        matches!(self, StoreError::StaleClaim { .. })
    }
}

/// The fencing token of a claim: which attempt a write is about and, for
/// the lease holder, who holds it.
///
/// Attempt numbers grow with every fresh claim (a handoff or a re-claim by
/// the same owner keeps them), and only the lease holder of an attempt can
/// record its artifact, so the attempt names one claim's work; the owner
/// additionally ties a write to the lease itself while the task is Leased.
/// The store refuses a write whose fence is not the task's current one
/// with [`StoreError::StaleClaim`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fence {
    pub attempt: u32,
    /// The lease holder (`None`: a decision about the attempt's outcome by
    /// someone who does not hold the lease, e.g. the router or scheduler
    /// acting on a message that carries the attempt).
    pub owner: Option<String>,
}

impl Fence {
    /// The token of the lease holder `owner` for `attempt`.
    pub fn holder(owner: impl Into<String>, attempt: u32) -> Self {
        Self {
            attempt,
            owner: Some(owner.into()),
        }
    }
    /// The token of a decision about `attempt` (from a message that
    /// carries it), made by someone who does not hold the lease.
    pub fn attempt(attempt: u32) -> Self {
        Self {
            attempt,
            owner: None,
        }
    }
    /// The holder's token of a record a claim returned.
    pub fn of(record: &TaskRecord) -> Self {
        Self {
            attempt: record.attempt,
            owner: record.lease_owner.clone(),
        }
    }
}

/// States of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for dependencies.
    Pending,
    /// In the ready set.
    Ready,
    /// Claimed by a lease owner (dispatched or running).
    Leased,
    /// Written, being checked (QA).
    Built,
    /// Finished; dependents released.
    Done,
    /// Dead-lettered; will not run again unless replayed.
    Failed,
    /// A dependency failed; will not run.
    Blocked,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Ready => "ready",
            TaskState::Leased => "leased",
            TaskState::Built => "built",
            TaskState::Done => "done",
            TaskState::Failed => "failed",
            TaskState::Blocked => "blocked",
        }
    }
    /// True once the task can change no more (without a replay).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Done | TaskState::Failed | TaskState::Blocked
        )
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pending" => TaskState::Pending,
            "ready" => TaskState::Ready,
            "leased" => TaskState::Leased,
            "built" => TaskState::Built,
            "done" => TaskState::Done,
            "failed" => TaskState::Failed,
            "blocked" => TaskState::Blocked,
            other => return Err(format!("unknown task state '{other}'")),
        })
    }
}

/// A task as created from an analyzed plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    pub path: String,
    pub spec: String,
    pub content: Option<String>,
    pub depends_on: Vec<String>,
    pub priority: u32,
    pub estimate: u32,
    pub executor: Option<String>,
}

impl NewTask {
    /// A task with no content, no explicit dependencies, priority and
    /// estimate 1 and the plan's default executor.
    pub fn new(path: impl Into<String>, spec: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            spec: spec.into(),
            content: None,
            depends_on: Vec::new(),
            priority: 1,
            estimate: 1,
            executor: None,
        }
    }
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub plan_id: String,
    pub path: String,
    pub spec: String,
    pub content: Option<String>,
    pub depends_on: Vec<String>,
    pub dependents: Vec<String>,
    pub priority: u32,
    pub estimate: u32,
    pub executor: Option<String>,
    pub state: TaskState,
    pub class: TaskClass,
    /// 0 before the first claim; incremented by each claim of a new attempt
    /// ([`TaskStore::requeue`] and replays start a new attempt).
    pub attempt: u32,
    pub lease_owner: Option<String>,
    pub lease_expires_ms: Option<i64>,
    /// Content hash of the latest artifact.
    pub artifact: Option<String>,
    /// Last error or diagnostics (for fixes and for blocked tasks, the cause).
    pub error: Option<String>,
    pub updated_ms: i64,
}

/// A plan as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRecord {
    pub id: String,
    pub name: String,
    pub status: PlanStatus,
    pub total: u32,
    pub done: u32,
    pub failed: u32,
    pub blocked: u32,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Opaque JSON the scheduler keeps with the plan (the analyzed plan).
    pub detail: String,
    pub message: Option<String>,
}

impl PlanRecord {
    /// A plan record about to be created: no counts yet (the store sets
    /// `total` from the tasks it is given), no detail, no message.
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        status: PlanStatus,
        now_ms: i64,
    ) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            status,
            total: 0,
            done: 0,
            failed: 0,
            blocked: 0,
            created_ms: now_ms,
            updated_ms: now_ms,
            detail: "{}".into(),
            message: None,
        }
    }
}

/// What [`TaskStore::claim`] found.
#[derive(Debug, Clone, PartialEq)]
// Boxing the record would cost an allocation per claim and change every
// caller's pattern for no gain: outcomes are short-lived return values.
#[allow(clippy::large_enum_variant)]
pub enum ClaimOutcome {
    /// The caller now holds the lease; the record is as of the claim.
    Claimed(TaskRecord),
    /// Someone else holds an unexpired lease.
    Held { owner: String, expires_ms: i64 },
    /// The task is not claimable in its state (done, pending, failed…).
    NotClaimable(TaskState),
}

/// What [`TaskStore::complete`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    /// False when the task was already done: nothing changed.
    pub newly_done: bool,
    /// Dependents that became Ready in this step.
    pub released: Vec<String>,
    /// Plan counts after the step.
    pub done: u32,
    pub total: u32,
    /// True when every task of the plan is now final.
    pub plan_finished: bool,
}

/// What [`TaskStore::fail`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Failure {
    /// False when the task was already failed: nothing changed.
    pub newly_failed: bool,
    /// Transitive dependents now Blocked.
    pub blocked: Vec<String>,
    pub plan_finished: bool,
}

/// The size and refill of a token bucket ([`TaskStore::token_bucket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketRate {
    /// Most tokens the bucket holds (e.g. requests per minute).
    pub capacity: u64,
    /// Time in which an empty bucket refills (a minute, shorter in tests).
    pub window: Duration,
}

/// What one [`TaskStore::token_bucket`] call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketStep {
    /// Take this many tokens, or say how long until they are there.
    Take(u64),
    /// Empty the bucket so that nothing is taken for this long.
    Drain(Duration),
}

/// The priority task store.
///
/// Every method is atomic on its own.
///
/// # Time
///
/// Lease times (claims, renewals, expiry) are the store's clock: Redis's
/// `TIME` read inside the scripts (Redis replicates script effects, so this
/// is deterministic for replicas), the memory store's own clock. Callers
/// pass durations, never instants, so two hosts whose clocks disagree still
/// agree on who holds a lease. Tests move the store's clock with
/// [`memory::MemoryStore::advance_clock`] and
/// [`redis::RedisStore::advance_clock`] (a skew kept in the store itself,
/// zero unless a test sets it). `updated_ms` of other transitions and kv
/// TTLs use the store client's clock (informational only).
///
/// A lease is live while `now <= lease_expires_ms` and expired once
/// `lease_expires_ms < now`. Every transition on a task that does not
/// exist fails with [`StoreError::UnknownTask`]; one that does not apply to
/// the task's state fails with [`StoreError::InvalidState`] naming it.
///
/// # Fencing
///
/// Writes about a claim's work ([`TaskStore::renew`],
/// [`TaskStore::mark_built`], [`TaskStore::requeue`],
/// [`TaskStore::complete`], [`TaskStore::fail`]) carry the claim's
/// [`Fence`]. The fence holds when its attempt is the task's attempt and,
/// if it names an owner while the task is Leased, that owner holds the
/// lease. A fence that does not hold is [`StoreError::StaleClaim`] (checked
/// before the state, after existence) and changes nothing; `renew` says
/// `false` instead.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// `redis` or `memory`.
    fn backend(&self) -> &'static str;

    /// Creates a plan and all its tasks in one step; tasks with no
    /// dependencies become Ready (class New, in plan order). Returns false
    /// (and changes nothing) when the plan already exists, so a redelivered
    /// plan creates nothing twice.
    ///
    /// Validated before anything is written: a dependency on a path not in
    /// the plan is [`StoreError::UnknownDependency`], a repeated path
    /// [`StoreError::DuplicateTask`], a plan id that is empty or contains
    /// `:`, `|` or whitespace [`StoreError::InvalidPlanId`]. Repeated
    /// entries in `depends_on` count once. The store sets `total` to the
    /// number of tasks and done/failed/blocked to zero; cycles are not
    /// checked (tasks on one never become ready).
    async fn create_plan(&self, plan: PlanRecord, tasks: Vec<NewTask>) -> StoreResult<bool>;

    async fn plan(&self, plan_id: &str) -> StoreResult<Option<PlanRecord>>;
    /// Every plan, newest first (by `created_ms`; ties by id, descending).
    async fn plans(&self) -> StoreResult<Vec<PlanRecord>>;
    /// Sets a plan's status and message (`None` clears it);
    /// [`StoreError::UnknownPlan`] if there is no such plan.
    async fn set_plan_status(
        &self,
        plan_id: &str,
        status: PlanStatus,
        message: Option<String>,
    ) -> StoreResult<()>;
    async fn task(&self, plan_id: &str, path: &str) -> StoreResult<Option<TaskRecord>>;
    /// Every task of a plan, in path order (one consistent snapshot);
    /// [`StoreError::UnknownPlan`] if there is no such plan.
    async fn tasks(&self, plan_id: &str) -> StoreResult<Vec<TaskRecord>>;

    /// Number of tasks in the ready set.
    async fn ready_len(&self) -> StoreResult<u64>;
    /// Takes the best Ready task and leases it to `owner` for `lease` from
    /// the store's now; increments its attempt. `None` when nothing is
    /// ready. Concurrent callers never receive the same task. Tasks of a
    /// plan whose status is [`PlanStatus::BudgetExhausted`] are not handed
    /// out: they stay Ready, in place, until the plan's status changes.
    async fn claim_next(&self, owner: &str, lease: Duration) -> StoreResult<Option<TaskRecord>>;
    /// Leases one named task: Ready, or Leased with an expired lease or by
    /// the same owner (a re-claim keeps the attempt), or Leased by the
    /// dispatcher `handoff_from` (the lease passes to `owner`).
    ///
    /// Checked in this order: Ready → fresh lease (attempt + 1); Leased by
    /// `owner` or by `handoff_from` → lease extended to now + `lease` and
    /// owned by `owner`, attempt kept (even if it had expired); Leased by
    /// someone else and expired → fresh lease; otherwise
    /// [`ClaimOutcome::Held`]. Any other state is
    /// [`ClaimOutcome::NotClaimable`]. The returned record's [`Fence::of`]
    /// is the claim's token.
    async fn claim(
        &self,
        plan_id: &str,
        path: &str,
        owner: &str,
        handoff_from: Option<&str>,
        lease: Duration,
    ) -> StoreResult<ClaimOutcome>;
    /// Extends a lease its holder still holds to now + `lease`; false when
    /// it lost it (the fence names no owner or no longer holds, the task is
    /// not Leased, or the lease already expired).
    async fn renew(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        lease: Duration,
    ) -> StoreResult<bool>;
    /// Returns tasks whose lease expired (`lease_expires_ms < now`, the
    /// store's now) to the back of the ready set, class and attempt kept
    /// (the next claim starts a new attempt); returns their
    /// `(plan_id, path)` in expiry order.
    async fn reap_expired(&self) -> StoreResult<Vec<(String, String)>>;
    /// Records the built artifact of the claim `fence` (Leased → Built);
    /// the lease is released.
    ///
    /// The fence must hold the lease: a task no longer Leased by it is
    /// [`StoreError::StaleClaim`], except the repeats of this same write
    /// (Built at the fence's attempt with the same artifact, or Done at the
    /// fence's attempt), which change nothing. Other states are
    /// [`StoreError::InvalidState`].
    async fn mark_built(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        artifact: &str,
    ) -> StoreResult<()>;
    /// Puts a task back in the ready set as a new attempt, with `class`
    /// (fixes first) and the error or diagnostics to carry (`None` clears
    /// it). Applies to Leased, Built and Ready tasks at the fence's attempt
    /// (the lease is released; the task goes to the back of its band); the
    /// attempt is incremented by the next claim. Other states are
    /// [`StoreError::InvalidState`].
    async fn requeue(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        class: TaskClass,
        error: Option<String>,
    ) -> StoreResult<()>;
    /// Completes a task (idempotent) and releases dependents whose last
    /// unfinished dependency it was.
    ///
    /// Leased or Built at the fence's attempt → Done: the lease is
    /// released, the artifact recorded, the error cleared, each dependent's
    /// count of unfinished dependencies drops by one and those reaching
    /// zero while Pending become Ready (class New) in the same step; plan
    /// counts are updated. On a task Done at the fence's attempt nothing
    /// changes (`newly_done` false, `released` empty, counts as they are);
    /// a fence of another attempt is [`StoreError::StaleClaim`]. Other
    /// states are [`StoreError::InvalidState`]. `released` is in path
    /// order.
    async fn complete(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        artifact: &str,
    ) -> StoreResult<Completion>;
    /// Fails a task for good (idempotent); its transitive dependents become
    /// Blocked with the cause.
    ///
    /// Any non-final task at the fence's attempt → Failed with `error` (out
    /// of the ready set, lease released); every transitive dependent not
    /// already final → Blocked with error `blocked by <path>: <error>`. On
    /// a task Failed at the fence's attempt nothing changes (`newly_failed`
    /// false); Done and Blocked tasks are [`StoreError::InvalidState`].
    /// `blocked` is in path order.
    async fn fail(
        &self,
        plan_id: &str,
        path: &str,
        fence: &Fence,
        error: &str,
    ) -> StoreResult<Failure>;
    /// Returns a Failed task, and the dependents it blocked, to play again:
    /// attempts reset, the task Ready (or Pending if a dependency is unfinished).
    ///
    /// If one of the task's own dependencies is Failed or Blocked, the task
    /// becomes Blocked instead. Then each Blocked task downstream none of
    /// whose direct dependencies is still Failed or Blocked is unblocked the
    /// same way (so a task blocked by a second failure stays blocked).
    /// Errors are cleared; plan counts follow. Only Failed tasks replay;
    /// other states are [`StoreError::InvalidState`].
    async fn replay(&self, plan_id: &str, path: &str) -> StoreResult<()>;

    /// Result cache: cache key → artifact hash.
    async fn cache_get(&self, key: &str) -> StoreResult<Option<String>>;
    async fn cache_put(&self, key: &str, artifact: &str) -> StoreResult<()>;
    /// Stores bytes under their SHA-256 (hex, see [`content_hash`]);
    /// returns the hash. Storing the same bytes again changes nothing.
    async fn put_artifact(&self, bytes: &[u8]) -> StoreResult<String>;
    async fn artifact(&self, hash: &str) -> StoreResult<Option<Vec<u8>>>;

    /// Adds `by` to a named counter (missing counts as 0); returns the new
    /// value.
    async fn incr(&self, counter: &str, by: i64) -> StoreResult<i64>;
    async fn counter(&self, counter: &str) -> StoreResult<i64>;

    /// One atomic step of the token bucket `bucket`, shared by every client
    /// of the store (fleet-wide rate limits). The bucket holds at most
    /// `rate.capacity` tokens and refills continuously at `rate.capacity`
    /// per `rate.window`, by the store's clock; a bucket never seen is full.
    /// [`BucketStep::Take`] takes `n` tokens if they are there and returns
    /// `None`, else takes nothing and returns how long until they will be
    /// (a take larger than the capacity waits for a full bucket and leaves
    /// it in debt). [`BucketStep::Drain`] empties the bucket so that the
    /// next take waits at least the given time (a provider's `Retry-After`)
    /// and returns `None`. Idle buckets expire.
    async fn token_bucket(
        &self,
        bucket: &str,
        rate: BucketRate,
        step: BucketStep,
    ) -> StoreResult<Option<Duration>>;

    /// Small records in named collections (canary deployments, breaker
    /// state, the DLQ index). `ttl` makes a record expire: from
    /// `now + ttl` (store client's clock) on, no read returns it and
    /// [`TaskStore::kv_put_new`] treats it as absent. A put without `ttl`
    /// makes the record permanent again.
    async fn kv_put(
        &self,
        collection: &str,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> StoreResult<()>;
    /// Writes only if absent (or expired), without a TTL; false when the
    /// key existed.
    async fn kv_put_new(&self, collection: &str, key: &str, value: &str) -> StoreResult<bool>;
    async fn kv_get(&self, collection: &str, key: &str) -> StoreResult<Option<String>>;
    async fn kv_delete(&self, collection: &str, key: &str) -> StoreResult<bool>;
    /// Every `(key, value)` of a collection, in key order.
    async fn kv_list(&self, collection: &str) -> StoreResult<Vec<(String, String)>>;

    // Compare-and-delete and retention (garbage collection of finished
    // plans, cache entries and artifacts).

    /// Deletes `key` from `collection` only while it holds exactly `value`
    /// (compare-and-delete); false when it is absent, expired or holds
    /// something else. Lets a caller remove the record it acted on without
    /// losing a newer one written meanwhile.
    async fn kv_delete_if(&self, collection: &str, key: &str, value: &str) -> StoreResult<bool>;
    /// Deletes a plan, its task list and its tasks (out of the ready and
    /// lease sets too), but only while the plan's status is final and its
    /// `updated_ms` is before `before_ms`: a live plan is never collected.
    /// False (and nothing changed) otherwise, or when there is no such plan.
    async fn delete_plan(&self, plan_id: &str, before_ms: i64) -> StoreResult<bool>;
    /// Every result-cache entry with the time it was last written (store
    /// client's clock), in key order. Entries written before the store
    /// recorded times are not listed.
    async fn cache_entries(&self) -> StoreResult<Vec<CacheEntry>>;
    /// Deletes a cache entry last written before `before_ms`; false when it
    /// is absent or was written since.
    async fn cache_delete(&self, key: &str, before_ms: i64) -> StoreResult<bool>;
    /// Every artifact hash with the time its bytes were last stored
    /// ([`TaskStore::put_artifact`] refreshes it even when the bytes were
    /// there already), in hash order.
    async fn artifact_hashes(&self) -> StoreResult<Vec<(String, i64)>>;
    /// Deletes an artifact last stored before `before_ms`; false when it is
    /// absent or was stored since (so a writer that just stored the bytes
    /// again keeps them).
    async fn delete_artifact(&self, hash: &str, before_ms: i64) -> StoreResult<bool>;

    // Usage and cost of executor runs (issue 13).

    /// Records the usage of the executor run of attempt `attempt` of task
    /// `path` (one [`Usage`] per model call it made) into the task's, the
    /// plan's (per model) and the fleet's (per model) totals, once: a
    /// second call for the same plan, path and attempt changes nothing and
    /// returns false, so a redelivered build never counts twice. Cost is
    /// kept in nano-dollars (see [`UsageTotals::cost_usd`]). Recording for
    /// a plan the store does not hold is [`StoreError::UnknownPlan`].
    /// [`TaskStore::delete_plan`] deletes the plan's usage too (the
    /// fleet's totals keep it). In the same step it reconciles the plan's
    /// budget: the run's reservation (if any) is released and, unless the
    /// call is a repeat, its usage added to what the plan spent. Call it
    /// with no usage to release the reservation of a run that failed.
    async fn record_usage(
        &self,
        plan_id: &str,
        path: &str,
        attempt: u32,
        usage: &[Usage],
    ) -> StoreResult<bool>;
    /// A plan's recorded usage: in total, per model and per task (empty
    /// for a plan with none or unknown).
    async fn plan_usage(&self, plan_id: &str) -> StoreResult<PlanUsage>;
    /// The fleet's usage per model since the store began (for `/metrics`).
    async fn usage_by_model(&self) -> StoreResult<BTreeMap<String, UsageTotals>>;

    // Plan budgets (issue 13): reservations before a call, reconciled by
    // `record_usage` after it.

    /// Sets (replaces) a plan's budget. What was spent and reserved is
    /// kept. The plan need not exist yet: the scheduler sets a plan's own
    /// budget before creating its tasks, so none of them runs without it.
    async fn set_budget(&self, plan_id: &str, limits: BudgetLimits) -> StoreResult<()>;
    /// A plan's budget: its limits (`None` when none was set), what its
    /// recorded runs spent and what runs in flight reserved.
    async fn budget(&self, plan_id: &str) -> StoreResult<BudgetState>;
    /// Reserves the expected usage of the executor run of attempt
    /// `attempt` of task `path` against the plan's budget (or `default`
    /// when the plan set none), in one atomic step: granted when
    /// [`BudgetLimits::covers`] spent + reserved and `expected`, refused
    /// ([`Reservation::Exhausted`]) otherwise (so an unestimated run is
    /// refused once a limit is reached). Granting adds `expected` to the plan's reserved usage until
    /// [`TaskStore::record_usage`] for the same run releases it (and adds
    /// the actual usage), or the attempt's lease ends without it (expired
    /// and reaped, or taken over by a fresh claim: the worker died or was
    /// paused past its lease, and a late `record_usage` still adds what
    /// the run spent): so concurrent workers never overshoot a limit by
    /// more than what is in flight beyond their estimates. Reserving again
    /// for a run that holds a reservation grants it without adding twice.
    /// With no limits at all it grants and reserves nothing.
    async fn reserve_budget(
        &self,
        plan_id: &str,
        path: &str,
        attempt: u32,
        expected: Spend,
        default: BudgetLimits,
    ) -> StoreResult<Reservation>;
}

/// Tokens and nano-dollars: what a run spends or may spend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spend {
    pub tokens: u64,
    pub cost_nusd: u64,
}

impl Spend {
    /// The spend of some usage totals.
    pub fn of(t: &UsageTotals) -> Self {
        Self {
            tokens: t.tokens(),
            cost_nusd: t.cost_nusd,
        }
    }
}

/// A plan's budget limits; `None` is no limit on that measure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetLimits {
    pub max_tokens: Option<u64>,
    /// In nano-dollars ([`nano_usd`]).
    pub max_cost_nusd: Option<u64>,
}

impl BudgetLimits {
    /// True when neither measure is limited.
    pub fn is_unlimited(&self) -> bool {
        self.max_tokens.is_none() && self.max_cost_nusd.is_none()
    }
    /// True when, for every limited measure, `used` (spent plus reserved)
    /// plus `next` stays within the limit, or, where `next` is zero (not
    /// estimated), `used` has not reached it yet. The rule both backends
    /// apply (`redis/reserve_budget.lua` mirrors it).
    pub fn covers(&self, used: Spend, next: Spend) -> bool {
        let fits = |max: Option<u64>, used: u64, next: u64| match max {
            None => true,
            Some(max) if next == 0 => used < max,
            Some(max) => used.saturating_add(next) <= max,
        };
        fits(self.max_tokens, used.tokens, next.tokens)
            && fits(self.max_cost_nusd, used.cost_nusd, next.cost_nusd)
    }
}

/// A plan's budget as the store holds it (see [`TaskStore::budget`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetState {
    /// `None` when the plan set no budget.
    pub limits: Option<BudgetLimits>,
    /// Actual usage of recorded runs.
    pub spent: Spend,
    /// Expected usage of runs in flight.
    pub reserved: Spend,
}

/// What [`TaskStore::reserve_budget`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// The run may go ahead.
    Granted,
    /// The budget cannot cover the run: hand the task back, stop the plan.
    Exhausted {
        limits: BudgetLimits,
        spent: Spend,
        reserved: Spend,
    },
}

/// Usage totals of a task, a plan or a model: calls, tokens and cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageTotals {
    /// Model calls (one per recorded [`Usage`]).
    pub calls: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Cost in nano-dollars (10^-9 USD): integers, so totals add up exactly
    /// in both backends.
    pub cost_nusd: u64,
    /// Calls whose tokens devfleet estimated (the provider did not count).
    pub estimated: u64,
}

impl UsageTotals {
    /// The totals of one call.
    pub fn of(usage: &Usage) -> Self {
        Self {
            calls: 1,
            tokens_in: usage.tokens_in,
            tokens_out: usage.tokens_out,
            cost_nusd: nano_usd(usage.cost_usd),
            estimated: u64::from(usage.estimated),
        }
    }
    /// Adds `other` (saturating).
    pub fn add(&mut self, other: &UsageTotals) {
        self.calls = self.calls.saturating_add(other.calls);
        self.tokens_in = self.tokens_in.saturating_add(other.tokens_in);
        self.tokens_out = self.tokens_out.saturating_add(other.tokens_out);
        self.cost_nusd = self.cost_nusd.saturating_add(other.cost_nusd);
        self.estimated = self.estimated.saturating_add(other.estimated);
    }
    /// Tokens in and out.
    pub fn tokens(&self) -> u64 {
        self.tokens_in.saturating_add(self.tokens_out)
    }
    /// The cost in US dollars.
    pub fn cost_usd(&self) -> f64 {
        self.cost_nusd as f64 / 1e9
    }
}

/// Dollars as whole nano-dollars (negative or not a number: 0).
pub fn nano_usd(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e9).round() as u64
    } else {
        0
    }
}

/// The name usage is counted under: `provider/model`, or the model alone
/// when the executor names no provider (`unknown` when it names neither).
pub fn usage_label(usage: &Usage) -> String {
    match (usage.provider.as_str(), usage.model.as_str()) {
        ("", "") => "unknown".to_owned(),
        ("", model) => model.to_owned(),
        (provider, "") => format!("{provider}/unknown"),
        (provider, model) => format!("{provider}/{model}"),
    }
}

/// A plan's usage (see [`TaskStore::plan_usage`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanUsage {
    pub total: UsageTotals,
    /// By [`usage_label`].
    pub by_model: BTreeMap<String, UsageTotals>,
    /// By task path.
    pub by_task: BTreeMap<String, UsageTotals>,
}

impl PlanUsage {
    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total.calls == 0
    }
}

/// One result-cache entry (see [`TaskStore::cache_entries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub key: String,
    /// The artifact hash the entry points to.
    pub artifact: String,
    /// When it was last written (ms since the epoch).
    pub written_ms: i64,
}

/// A shared handle to some store.
pub type SharedStore = Arc<dyn TaskStore>;

/// SHA-256 of bytes, lowercase hex: the artifact and cache key hash.
pub fn content_hash(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Connects to the store a URL names: `redis://…` or `memory://`.
pub async fn connect(url: &str) -> StoreResult<SharedStore> {
    connect_with_prefix(url, "devfleet").await
}

/// Like [`connect`], with every Redis key under `prefix` (so several
/// pipelines or test runs can share one Redis).
pub async fn connect_with_prefix(url: &str, prefix: &str) -> StoreResult<SharedStore> {
    match url.split_once("://") {
        Some(("redis" | "rediss", _)) => {
            Ok(Arc::new(redis::RedisStore::connect(url, prefix).await?))
        }
        Some(("memory", _)) => Ok(Arc::new(memory::MemoryStore::new())),
        _ => Err(StoreError::InvalidUrl {
            url: url.to_owned(),
            reason: "expected redis://HOST:PORT or memory://".into(),
        }),
    }
}
