//! Names of the work queues and broadcast subjects.
//!
//! Work queues are point-to-point with competing consumers and at-least-once
//! delivery; broadcast subjects are best-effort fan-out (metrics and events).

/// `devfleet publish` → analyzer. Body: [`crate::PlanSubmitted`].
pub const PLANS_SUBMITTED: &str = "plans.submitted";
/// analyzer → scheduler. Body: [`crate::PlanAnalyzed`].
pub const PLANS_ANALYZED: &str = "plans.analyzed";
/// scheduler → dev-worker. Body: [`crate::TaskWork`].
pub const WORK_DEV: &str = "work.dev";
/// dev-worker → router. Body: [`crate::TaskBuilt`].
pub const TASK_BUILT: &str = "task.built";
/// dev-worker / qa-worker → router. Body: [`crate::TaskFailed`].
pub const TASK_FAILED: &str = "task.failed";
/// router → qa-worker. Body: [`crate::QaWork`].
pub const WORK_QA: &str = "work.qa";
/// qa-worker → router. Body: [`crate::QaResult`].
pub const QA_RESULTS: &str = "qa.results";
/// router → scheduler. Body: [`crate::TaskDone`].
pub const TASK_DONE: &str = "task.done";
/// router → scheduler: a task failed for good. Body: [`crate::TaskFinallyFailed`].
pub const TASK_FINALLY_FAILED: &str = "task.finally_failed";
/// scheduler → qa-worker. Body: [`crate::IntegrationWork`].
pub const WORK_INTEGRATION: &str = "work.integration";
/// qa-worker → scheduler. Body: [`crate::IntegrationResult`].
pub const INTEGRATION_RESULTS: &str = "integration.results";
/// scheduler or CLI → canary. Body: [`crate::DeployRequested`].
pub const DEPLOY_REQUESTED: &str = "deploy.requested";
/// canary → scheduler: a plan's rollout ended. Body: [`crate::DeployFinished`].
pub const DEPLOY_FINISHED: &str = "deploy.finished";

/// Every work queue, in flow order (used to declare topology and report depths).
pub const ALL_WORK_QUEUES: &[&str] = &[
    PLANS_SUBMITTED,
    PLANS_ANALYZED,
    WORK_DEV,
    TASK_BUILT,
    TASK_FAILED,
    WORK_QA,
    QA_RESULTS,
    TASK_DONE,
    TASK_FINALLY_FAILED,
    WORK_INTEGRATION,
    INTEGRATION_RESULTS,
    DEPLOY_REQUESTED,
    DEPLOY_FINISHED,
];

/// Broadcast subject prefix for metrics: `devfleet.metrics.<metric_type>`.
pub const METRICS_PREFIX: &str = "devfleet.metrics";
/// Broadcast subject prefix for pipeline events: `devfleet.events.<kind>`.
pub const EVENTS_PREFIX: &str = "devfleet.events";

/// The broadcast subject for one metric type.
pub fn metric_subject(metric_type: crate::MetricType) -> String {
    format!("{METRICS_PREFIX}.{}", metric_type.as_str())
}

/// The broadcast subject for one event kind.
pub fn event_subject(kind: &str) -> String {
    format!("{EVENTS_PREFIX}.{kind}")
}
