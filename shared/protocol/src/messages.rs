//! Message bodies. Each says who publishes it, who consumes it and what an
//! acknowledgement means. The store is the source of truth for task state;
//! messages carry ids and the facts needed to act, not copies of the store.

use crate::plan::{DeploySpec, ExecutorKind, IntegrationStep, Plan};
use serde::{Deserialize, Serialize};

/// A plan entering the pipeline.
///
/// Published by `devfleet publish` on `plans.submitted`; consumed by the
/// analyzer, which acks once `plans.analyzed` or a rejection is confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanSubmitted {
    pub plan_id: String,
    pub plan: Plan,
}

/// One task as the analyzer resolved it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalyzedTask {
    pub path: String,
    pub spec: String,
    #[serde(default)]
    pub content: Option<String>,
    /// Every task this one needs done first (parsed and explicit edges).
    pub depends_on: Vec<String>,
    pub estimate: u32,
    /// Longest remaining path to a sink, including this task. Higher runs first.
    pub priority: u32,
    /// Topological layer (0 = no dependencies).
    pub batch: u32,
    #[serde(default)]
    pub executor: Option<ExecutorKind>,
    /// Files of the plan's base snapshot this task imports (sorted,
    /// relative paths of the snapshot's manifest): context for executors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base_imports: Vec<String>,
}

/// A plan turned into a DAG.
///
/// Published by the analyzer on `plans.analyzed`; consumed by the scheduler,
/// which acks once the plan and its tasks are durably in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanAnalyzed {
    pub plan_id: String,
    pub plan: Plan,
    pub tasks: Vec<AnalyzedTask>,
    /// Sum of estimates along the critical path.
    pub critical_path_length: u64,
    pub critical_path: Vec<String>,
}

/// A plan the analyzer refused.
///
/// Published by the analyzer as the `plan.rejected` event; consumed by the
/// gateway and `devfleet publish --wait`. Best effort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRejected {
    pub plan_id: String,
    pub name: String,
    pub error: String,
}

/// Why a task is being worked on: fixes run before new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskClass {
    Fix,
    New,
}

impl TaskClass {
    /// Sort rank: lower goes first.
    pub fn rank(self) -> u8 {
        match self {
            TaskClass::Fix => 0,
            TaskClass::New => 1,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TaskClass::Fix => "fix",
            TaskClass::New => "new",
        }
    }
}

/// A task handed to a dev-worker.
///
/// Published by the scheduler on `work.dev`; consumed by a dev-worker, which
/// acks once its `task.built` or `task.failed` is confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskWork {
    pub plan_id: String,
    pub path: String,
    /// 1 for the first try; grows across retries and fixes.
    pub attempt: u32,
    pub class: TaskClass,
}

/// A file was written.
///
/// Published by a dev-worker on `task.built`; consumed by the router, which
/// acks once it has routed the task onwards. The scheduler's watchdog
/// publishes it again for a task left Built with no QA in flight, with
/// `executor` [`REANNOUNCED_EXECUTOR`]: no executor ran for that message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskBuilt {
    pub plan_id: String,
    pub path: String,
    pub attempt: u32,
    /// Content hash of the artifact in the store.
    pub artifact: String,
    /// The artifact came from the result cache: no executor ran.
    pub cache_hit: bool,
    pub executor: String,
    pub duration_ms: u64,
    /// This announces again a build announced before (a redelivered work
    /// message found the task already Built): no executor ran. Absent
    /// (false) from writers that predate it.
    #[serde(default)]
    pub reannounced: bool,
}

impl TaskBuilt {
    /// True when an executor produced this artifact just now: neither a
    /// cache hit nor a re-announcement. Only such builds tell whether the
    /// dev stage works (the router's breaker counts them).
    pub fn ran_executor(&self) -> bool {
        !self.cache_hit && !self.reannounced
    }
}

/// Tokens and cost of one model call (or one agent run), as an executor
/// reports it: from the API's `usage`, from what an agent profile reports,
/// else a configured per-run estimate (`estimated`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// The provider's configured name (`""` when the executor has none).
    #[serde(default)]
    pub provider: String,
    /// The model that answered (or the agent profile's name).
    pub model: String,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Cost from the provider's price table, US dollars.
    #[serde(default)]
    pub cost_usd: f64,
    /// Not counted by the provider: estimated by devfleet.
    #[serde(default)]
    pub estimated: bool,
}

/// The `executor` of a [`TaskBuilt`] the scheduler's watchdog announced
/// again (not a new build: no executor ran).
pub const REANNOUNCED_EXECUTOR: &str = "watchdog";

/// Which stage a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Dev,
    Qa,
    Integration,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Dev => "dev",
            Stage::Qa => "qa",
            Stage::Integration => "integration",
        }
    }
}

/// A task attempt failed.
///
/// Published by a dev-worker on `task.failed`; consumed by the router, which
/// retries with backoff or dead-letters, then acks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFailed {
    pub plan_id: String,
    pub path: String,
    pub attempt: u32,
    pub stage: Stage,
    pub error: String,
    /// False when retrying cannot help (e.g. a builtin task without content).
    pub retryable: bool,
}

/// A built file to check.
///
/// Published by the router on `work.qa`; consumed by a qa-worker, which acks
/// once its `qa.results` message is confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaWork {
    pub plan_id: String,
    pub path: String,
    pub attempt: u32,
    pub artifact: String,
}

/// Outcome of one check command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    /// `passed`, `failed`, `timeout` or `skipped` (with the reason in output).
    pub status: String,
    pub output: String,
    pub duration_ms: u64,
}

/// QA verdict on one file.
///
/// Published by a qa-worker on `qa.results`; consumed by the router, which
/// acks once it has published `task.done` or queued a fix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaResult {
    pub plan_id: String,
    pub path: String,
    pub attempt: u32,
    pub artifact: String,
    pub passed: bool,
    /// Trimmed diagnostics for the fix task.
    pub diagnostics: String,
    pub checks: Vec<CheckResult>,
}

/// A task passed every stage.
///
/// Published by the router (or the direct seam in embedded mode) on
/// `task.done`; consumed by the scheduler, which acks once the store has
/// completed the task and released its dependents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDone {
    pub plan_id: String,
    pub path: String,
    pub attempt: u32,
    pub artifact: String,
}

/// A task failed for good: the router gave up on it (its failures reached
/// the limit, or a failure was not retryable), recorded it Failed in the
/// store (its dependents Blocked) and indexed it in the dead-letter queue.
///
/// Published by the router on `task.finally_failed`; consumed by the
/// scheduler, which alone ends plans: it acks once the plan has moved on
/// (ended Failed) when this was its last unfinished task, or at once when
/// other tasks still run. A repeated report changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFinallyFailed {
    pub plan_id: String,
    pub path: String,
    pub attempt: u32,
    /// Why the router gave up; the error recorded with the task.
    pub reason: String,
    /// The dead-letter entry (`devfleet dlq list`), when there is one.
    #[serde(default)]
    pub dlq_id: Option<String>,
}

/// One attempt in a task's history, carried into the DLQ and escalations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub stage: Stage,
    pub error: String,
    pub at_ms: i64,
}

/// A task (or plan) a human or the planner must look at.
///
/// Published by the router as the `escalation` event when a task is
/// dead-lettered, and by the scheduler when integration fails. Best effort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Escalation {
    pub plan_id: String,
    #[serde(default)]
    pub path: Option<String>,
    pub reason: String,
    pub history: Vec<AttemptRecord>,
}

/// A stage's circuit breaker changed state.
///
/// Published by the router as the `breaker.changed` event when the breaker
/// of a stage (`dev` or `qa`) opens, goes half-open or closes; consumed by
/// the metrics gateway and operators. Best effort: the store's `breaker`
/// collection holds the truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerChanged {
    pub stage: Stage,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Why, for people: the error rate and volume that opened it, or the probe outcome.
    pub reason: String,
    /// Errors / outcomes in the window when it changed (0 when not measured).
    pub error_rate: f64,
    /// Outcomes in the window when it changed.
    pub volume: u64,
}

/// Lifecycle of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    Submitted,
    Analyzed,
    Rejected,
    Running,
    Integrating,
    Deploying,
    Succeeded,
    Failed,
    /// The plan's budget cannot cover its next executor call: nothing of
    /// it is dispatched, running work finishes, the rest waits. Not final:
    /// `devfleet budget PLAN_ID …` raises the budget and the plan runs
    /// again.
    BudgetExhausted,
}

impl PlanStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanStatus::Submitted => "submitted",
            PlanStatus::Analyzed => "analyzed",
            PlanStatus::Rejected => "rejected",
            PlanStatus::Running => "running",
            PlanStatus::Integrating => "integrating",
            PlanStatus::Deploying => "deploying",
            PlanStatus::Succeeded => "succeeded",
            PlanStatus::Failed => "failed",
            PlanStatus::BudgetExhausted => "budget_exhausted",
        }
    }
    /// True once the plan can change no more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            PlanStatus::Rejected | PlanStatus::Succeeded | PlanStatus::Failed
        )
    }
}

/// Progress or an outcome of a plan.
///
/// Published by the scheduler as the `plan.event` event. Best effort; the
/// store holds the truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanEvent {
    pub plan_id: String,
    pub name: String,
    pub status: PlanStatus,
    pub done: u32,
    pub failed: u32,
    pub total: u32,
    #[serde(default)]
    pub message: Option<String>,
}

/// One integration shard to run.
///
/// Published by the scheduler on `work.integration`; consumed by a qa-worker,
/// which acks once its `integration.results` message is confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntegrationWork {
    pub plan_id: String,
    pub step: IntegrationStep,
    /// 0-based shard index, < `shard_count`.
    pub shard_index: u32,
    pub shard_count: u32,
}

/// Outcome of one integration shard.
///
/// Published by a qa-worker on `integration.results`; consumed by the
/// scheduler, which acks once the result is recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntegrationResult {
    pub plan_id: String,
    pub step: String,
    pub shard_index: u32,
    pub shard_count: u32,
    pub passed: bool,
    pub output: String,
    pub duration_ms: u64,
}

/// Start a canary rollout.
///
/// Published by the scheduler (integration passed) or `devfleet canary start`
/// on `deploy.requested`; consumed by the canary, which acks once the
/// deployment is recorded in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployRequested {
    pub deployment_id: String,
    #[serde(default)]
    pub plan_id: Option<String>,
    pub spec: DeploySpec,
}

/// A rollout that belongs to a plan ended: promoted to 100 % or rolled
/// back.
///
/// Published by the canary on `deploy.finished` once the deployment's final
/// status is recorded (before it stops tracking the deployment, so a canary
/// that dies in between publishes it again on resume); consumed by the
/// scheduler, which alone ends plans: it acks once the plan moved from
/// Deploying to Succeeded or Failed (at once for a plan not waiting on a
/// rollout). A repeated report changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployFinished {
    pub plan_id: String,
    pub deployment_id: String,
    /// True when the rollout reached its last stage; false when it was
    /// rolled back.
    pub promoted: bool,
    /// For people: what happened (the rollback's reason).
    pub message: String,
}

/// The seven metric families of the gateway protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricType {
    TaskProgress,
    SystemHealth,
    Performance,
    QueueStatus,
    WorkerStatus,
    Error,
    Deployment,
}

impl MetricType {
    pub const ALL: [MetricType; 7] = [
        MetricType::TaskProgress,
        MetricType::SystemHealth,
        MetricType::Performance,
        MetricType::QueueStatus,
        MetricType::WorkerStatus,
        MetricType::Error,
        MetricType::Deployment,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::TaskProgress => "task_progress",
            MetricType::SystemHealth => "system_health",
            MetricType::Performance => "performance",
            MetricType::QueueStatus => "queue_status",
            MetricType::WorkerStatus => "worker_status",
            MetricType::Error => "error",
            MetricType::Deployment => "deployment",
        }
    }
}

impl std::str::FromStr for MetricType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MetricType::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown metric type '{s}'"))
    }
}

/// One metric sample.
///
/// Published by every service on the broadcast subject
/// `devfleet.metrics.<type>`; consumed by the metrics gateway. Best effort.
/// Build one with [`Metric::from_body`] and read it with [`Metric::body`]
/// (see [`crate::metrics`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub metric_type: MetricType,
    /// The service instance that measured it.
    pub source: String,
    /// The body, one of the [`crate::metrics`] structs, as the map the
    /// gateway forwards to clients; numeric fields are aggregated there.
    pub data: serde_json::Value,
}

/// Every message that can travel in an [`crate::Envelope`].
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    PlanSubmitted(PlanSubmitted),
    PlanAnalyzed(PlanAnalyzed),
    PlanRejected(PlanRejected),
    PlanEvent(PlanEvent),
    TaskWork(TaskWork),
    TaskBuilt(TaskBuilt),
    TaskFailed(TaskFailed),
    QaWork(QaWork),
    QaResult(QaResult),
    TaskDone(TaskDone),
    TaskFinallyFailed(TaskFinallyFailed),
    Escalation(Escalation),
    BreakerChanged(BreakerChanged),
    IntegrationWork(IntegrationWork),
    IntegrationResult(IntegrationResult),
    DeployRequested(DeployRequested),
    DeployFinished(DeployFinished),
    Metric(Metric),
}

macro_rules! message_kinds {
    ($($variant:ident => $kind:literal),* $(,)?) => {
        impl Message {
            /// The kind string written on the wire.
            pub fn kind(&self) -> &'static str {
                match self { $(Message::$variant(_) => $kind,)* }
            }

            /// Every kind this version understands.
            pub const KINDS: &'static [&'static str] = &[$($kind),*];

            pub(crate) fn encode_body(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
                match self { $(Message::$variant(b) => rmp_serde::to_vec_named(b),)* }
            }

            pub(crate) fn decode_body(kind: &str, body: &[u8]) -> Option<Result<Message, rmp_serde::decode::Error>> {
                match kind {
                    $($kind => Some(rmp_serde::from_slice(body).map(Message::$variant)),)*
                    _ => None,
                }
            }
        }
        $(
            impl From<$variant> for Message {
                fn from(body: $variant) -> Self { Message::$variant(body) }
            }
        )*
    };
}

message_kinds! {
    PlanSubmitted => "plan.submitted",
    PlanAnalyzed => "plan.analyzed",
    PlanRejected => "plan.rejected",
    PlanEvent => "plan.event",
    TaskWork => "task.work",
    TaskBuilt => "task.built",
    TaskFailed => "task.failed",
    QaWork => "qa.work",
    QaResult => "qa.result",
    TaskDone => "task.done",
    TaskFinallyFailed => "task.finally_failed",
    Escalation => "escalation",
    BreakerChanged => "breaker.changed",
    IntegrationWork => "integration.work",
    IntegrationResult => "integration.result",
    DeployRequested => "deploy.requested",
    DeployFinished => "deploy.finished",
    Metric => "metric",
}

impl Message {
    /// The plan and task this message is about, for the envelope header.
    pub fn ids(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Message::PlanSubmitted(m) => (Some(&m.plan_id), None),
            Message::PlanAnalyzed(m) => (Some(&m.plan_id), None),
            Message::PlanRejected(m) => (Some(&m.plan_id), None),
            Message::PlanEvent(m) => (Some(&m.plan_id), None),
            Message::TaskWork(m) => (Some(&m.plan_id), Some(&m.path)),
            Message::TaskBuilt(m) => (Some(&m.plan_id), Some(&m.path)),
            Message::TaskFailed(m) => (Some(&m.plan_id), Some(&m.path)),
            Message::QaWork(m) => (Some(&m.plan_id), Some(&m.path)),
            Message::QaResult(m) => (Some(&m.plan_id), Some(&m.path)),
            Message::TaskDone(m) => (Some(&m.plan_id), Some(&m.path)),
            Message::TaskFinallyFailed(m) => (Some(&m.plan_id), Some(&m.path)),
            Message::Escalation(m) => (Some(&m.plan_id), m.path.as_deref()),
            Message::BreakerChanged(_) => (None, None),
            Message::IntegrationWork(m) => (Some(&m.plan_id), None),
            Message::IntegrationResult(m) => (Some(&m.plan_id), None),
            Message::DeployRequested(m) => (m.plan_id.as_deref(), None),
            Message::DeployFinished(m) => (Some(&m.plan_id), None),
            Message::Metric(_) => (None, None),
        }
    }

    /// The task attempt this message is about (0 when not about an attempt).
    pub fn attempt(&self) -> u32 {
        match self {
            Message::TaskWork(m) => m.attempt,
            Message::TaskBuilt(m) => m.attempt,
            Message::TaskFailed(m) => m.attempt,
            Message::QaWork(m) => m.attempt,
            Message::QaResult(m) => m.attempt,
            Message::TaskDone(m) => m.attempt,
            Message::TaskFinallyFailed(m) => m.attempt,
            _ => 0,
        }
    }
}
