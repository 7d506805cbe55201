//! Metric bodies: one typed struct per sample a service emits, grouped by
//! [`MetricType`].
//!
//! A [`Metric`] carries its body as a self-describing map (`data`), and the
//! gateway forwards that map to WebSocket clients unchanged, so the JSON a
//! dashboard sees is exactly what these structs serialize to. Emitters build
//! a struct and hand it to the runtime's `Metrics::emit`; the metric type
//! follows from the struct ([`MetricBody::METRIC_TYPE`]), so a body cannot be
//! sent under the wrong type. Readers decode with [`Metric::body`] (or
//! [`DeploymentSample`] for the deployment type, which has two shapes).
//!
//! Where one type has several shapes, a constant field tells them apart and
//! is written by serde (`#[serde(tag = ...)]`): `status` for task progress
//! (`fixing`, `retrying`), `component` for system health, `stage` for
//! timings and stage errors, `event` for a refused deployment.
//!
//! To add a body: define the struct here (derives as its neighbours, a
//! `#[serde(tag = ...)]` when its type already has a body of a similar
//! shape), list it under its type in `metric_bodies!`, add a fixture to
//! `tests/golden.rs` and bless its golden JSON. To add a field to a body,
//! see below.
//!
//! # Compatibility
//!
//! Bodies follow the crate's wire rule (see the crate docs): fields are only
//! ever added, each added field is `#[serde(default)]` (or an `Option`), and
//! no field is renamed or retyped. A reader ignores fields it does not know
//! and defaults the ones a writer did not send. A body that still does not
//! decode into the struct a reader expects (an older emitter's shape, a test
//! sample, a newer breaking shape) is not an error of the message: the
//! gateway forwards and aggregates its map as it is and only skips what it
//! would have learned from the typed fields. Metrics are a best-effort
//! broadcast with no acknowledgement, so no body can be dead-lettered or
//! redelivered in a loop.

use crate::messages::{Metric, MetricType, PlanStatus, Stage};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// A typed metric body, and the one [`MetricType`] it is sent under.
pub trait MetricBody: Serialize + DeserializeOwned {
    /// The type (and so the subject `devfleet.metrics.<type>`) of this body.
    const METRIC_TYPE: MetricType;
    /// The constant `(field, value)` serde writes for a tagged body, which
    /// [`Metric::body`] checks on reading (serde itself ignores it there).
    const TAG: Option<(&'static str, &'static str)> = None;
}

/// Why a [`Metric`] could not be built from, or read as, a typed body.
#[derive(Debug, thiserror::Error)]
pub enum MetricBodyError {
    #[error("a '{found}' metric is not a '{expected}' body")]
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    #[error("metric body is not a '{value}' body: its '{field}' differs")]
    WrongTag {
        field: &'static str,
        value: &'static str,
    },
    #[error("metric body does not {action}: {error}")]
    Json {
        action: &'static str,
        error: serde_json::Error,
    },
}

impl Metric {
    /// A sample of `body` measured by `source`.
    pub fn from_body<B: MetricBody>(
        source: impl Into<String>,
        body: &B,
    ) -> Result<Metric, MetricBodyError> {
        let data = serde_json::to_value(body).map_err(|error| MetricBodyError::Json {
            action: "encode",
            error,
        })?;
        Ok(Metric {
            metric_type: B::METRIC_TYPE,
            source: source.into(),
            data,
        })
    }

    /// Reads the body as `B`. Fails when the metric is of another type or
    /// its map lacks a field `B` requires; unknown fields are ignored.
    pub fn body<B: MetricBody>(&self) -> Result<B, MetricBodyError> {
        if self.metric_type != B::METRIC_TYPE {
            return Err(MetricBodyError::WrongType {
                expected: B::METRIC_TYPE.as_str(),
                found: self.metric_type.as_str(),
            });
        }
        if let Some((field, value)) = B::TAG {
            if self.data.get(field).and_then(serde_json::Value::as_str) != Some(value) {
                return Err(MetricBodyError::WrongTag { field, value });
            }
        }
        B::deserialize(&self.data).map_err(|error| MetricBodyError::Json {
            action: "decode",
            error,
        })
    }
}

macro_rules! metric_bodies {
    ($($metric_type:ident => [$($body:ident $(($field:literal = $value:literal))?),* $(,)?]),* $(,)?) => {
        /// Every body this version defines, by struct name, with its type:
        /// the list the golden-bytes tests check their fixtures against.
        pub const ALL_BODIES: &[(&str, MetricType)] = &[
            $($((stringify!($body), MetricType::$metric_type),)*)*
        ];
        $($(
            impl MetricBody for $body {
                const METRIC_TYPE: MetricType = MetricType::$metric_type;
                $(const TAG: Option<(&'static str, &'static str)> = Some(($field, $value));)?
            }
        )*)*
    };
}

// The tags must match the `#[serde(tag, rename)]` of each struct (a test checks).
metric_bodies! {
    TaskProgress => [
        PlanProgress,
        TaskCompleted,
        TaskFixing("status" = "fixing"),
        TaskRetrying("status" = "retrying"),
    ],
    Error => [
        TaskFailure,
        TaskDeadLettered,
        IntegrationFailure("stage" = "integration"),
        AnalyzeFailure("stage" = "analyze"),
        BuildFailure("stage" = "dev"),
    ],
    SystemHealth => [
        DispatchHealth("component" = "dispatch"),
        BreakerHealth("component" = "circuit_breaker"),
        SandboxHealth("component" = "qa_sandbox"),
    ],
    Performance => [
        AnalyzeTiming("stage" = "analyze"),
        BuildTiming,
        QaCheckTiming("stage" = "qa"),
        IntegrationTiming("stage" = "integration"),
    ],
    QueueStatus => [QueueStatus],
    WorkerStatus => [WorkerStatus],
    Deployment => [DeploymentProgress, DeploymentRefused("event" = "refused")],
}

// ---------------------------------------------------------------- task_progress

/// A plan's counts: when the scheduler starts it and when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanProgress {
    pub plan_id: String,
    pub name: String,
    pub status: PlanStatus,
    pub done: u32,
    pub failed: u32,
    pub blocked: u32,
    pub total: u32,
}

/// A task completed (scheduler): the plan's progress and how many
/// dependents it released.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCompleted {
    pub plan_id: String,
    pub path: String,
    pub status: PlanStatus,
    pub done: u32,
    pub total: u32,
    pub released: u64,
}

/// QA failed and the router queued a fix task. Written with `status: "fixing"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename = "fixing")]
pub struct TaskFixing {
    pub plan_id: String,
    pub path: String,
    pub attempt: u32,
    /// Failures of the task so far, this one included.
    pub failures: u32,
}

/// An attempt failed and the router scheduled a retry. Written with
/// `status: "retrying"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename = "retrying")]
pub struct TaskRetrying {
    pub plan_id: String,
    pub path: String,
    pub stage: Stage,
    pub attempt: u32,
    pub failures: u32,
    pub delay_ms: u64,
}

// ------------------------------------------------------------------------ error

/// A task failed for good (scheduler) and the dependents it blocked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFailure {
    pub plan_id: String,
    pub path: String,
    pub error: String,
    pub blocked: Vec<String>,
}

/// A task the router dead-lettered, with its DLQ entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDeadLettered {
    pub plan_id: String,
    pub path: String,
    pub error: String,
    pub dlq_id: String,
    pub blocked: Vec<String>,
}

/// A plan's integration failed. Written with `stage: "integration"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename = "integration")]
pub struct IntegrationFailure {
    pub plan_id: String,
    /// `step#shard` of every failed shard.
    pub failed_steps: Vec<String>,
}

/// The analyzer rejected a plan. Written with `stage: "analyze"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename = "analyze")]
pub struct AnalyzeFailure {
    pub plan_id: String,
    pub error: String,
}

/// A dev-worker's build attempt failed. Written with `stage: "dev"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename = "dev")]
pub struct BuildFailure {
    pub plan_id: String,
    pub path: String,
    pub error: String,
    pub retryable: bool,
    pub instance: String,
}

// ---------------------------------------------------------------- system_health

/// The scheduler's dev breaker as dispatch sees it. Written with
/// `component: "dispatch"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "component", rename = "dispatch")]
pub struct DispatchHealth {
    pub stage: Stage,
    /// `closed`, `open` or `half_open`.
    pub breaker: String,
    /// `normal`, `paused` or `probing`.
    pub dispatch: String,
    pub healthy: bool,
    pub generation: u64,
    pub reason: String,
    pub probes: u32,
    pub until_ms: Option<i64>,
}

/// A stage's circuit breaker (router). Written with
/// `component: "circuit_breaker"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "component", rename = "circuit_breaker")]
pub struct BreakerHealth {
    pub stage: Stage,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    pub open: bool,
    pub reason: String,
    pub error_rate: f64,
    pub volume: u64,
    pub since_ms: i64,
    pub until_ms: Option<i64>,
}

/// A qa-worker's sandbox. Written with `component: "qa_sandbox"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "component", rename = "qa_sandbox")]
pub struct SandboxHealth {
    /// The isolation in use; `none` when checks run unisolated.
    pub isolation: String,
    pub healthy: bool,
    pub warning: Option<String>,
    pub slots: u64,
}

// ------------------------------------------------------------------ performance

/// How long the analyzer took for a plan. Written with `stage: "analyze"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename = "analyze")]
pub struct AnalyzeTiming {
    pub plan_id: String,
    pub tasks: u64,
    pub duration_ms: u64,
}

/// How long a dev-worker took to build a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildTiming {
    pub plan_id: String,
    pub path: String,
    pub duration_ms: u64,
    pub cache_hit: bool,
    pub executor: String,
    pub instance: String,
}

/// How long one QA check took. Written with `stage: "qa"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename = "qa")]
pub struct QaCheckTiming {
    pub check: String,
    /// `passed`, `failed`, `timeout` or `skipped`.
    pub status: String,
    pub duration_ms: u64,
    pub sandbox: String,
}

/// How long one integration shard took. Written with `stage: "integration"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename = "integration")]
pub struct IntegrationTiming {
    pub step: String,
    pub shard: u32,
    pub passed: bool,
    pub duration_ms: u64,
    pub sandbox: String,
}

/// The fields every timed sample shares, read from any body (typed or not,
/// sample or event frame): what the gateway's latency histograms need.
/// Fields of another JSON type read as absent rather than failing.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Timing {
    #[serde(default, deserialize_with = "lenient")]
    pub duration_ms: Option<f64>,
    #[serde(default, deserialize_with = "lenient")]
    pub stage: Option<String>,
}

/// `Some` when the value has the wanted type, `None` for anything else.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

// ----------------------------------------------------------------- queue_status

/// The scheduler's view of the dev queue and the fleet, each dispatch round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    pub ready_len: u64,
    pub work_dev_depth: u64,
    pub dispatched_unreported: u64,
    pub workers: u64,
    pub slots: u64,
    pub busy: u64,
    pub waiting: u64,
    pub free_slots: u64,
    /// `closed`, `open` or `half_open`.
    pub dev_breaker: String,
}

// ---------------------------------------------------------------- worker_status

/// A dev-worker's slots, each autoscale tick. Fields added later must be
/// defaulted; the gateway sums `slots`, `busy` and `waiting` over instances.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The worker instance; a reader falls back to the sample's source when empty.
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub slots: u64,
    #[serde(default)]
    pub busy: u64,
    #[serde(default)]
    pub waiting: u64,
    #[serde(default)]
    pub backlog: u64,
}

// ------------------------------------------------------------------- deployment

/// A canary deployment's state after an event (`shifted`, `check`,
/// `promoted`, `rollback_started`, `rolled_back`, `handler_failed`, ...).
///
/// Only `deployment_id` is required; everything else defaults, so a reader
/// keeps what a sample has.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeploymentProgress {
    pub deployment_id: String,
    #[serde(default)]
    pub plan_id: Option<String>,
    #[serde(default)]
    pub event: String,
    #[serde(default)]
    pub status: String,
    /// 0-based index of the current stage.
    #[serde(default)]
    pub stage: u64,
    /// Number of stages.
    #[serde(default)]
    pub stages: u64,
    /// Traffic percentage on the canary now.
    #[serde(default)]
    pub weight: u32,
    /// Traffic percentage of the current stage.
    #[serde(default)]
    pub target_weight: u32,
    #[serde(default)]
    pub stage_elapsed_s: f64,
    #[serde(default)]
    pub classification: Option<String>,
    #[serde(default)]
    pub error_rate: Option<f64>,
    /// The error rate for people, e.g. `1.25%`.
    #[serde(default)]
    pub error_rate_pct: Option<String>,
    #[serde(default)]
    pub latency_p95_ms: Option<f64>,
    #[serde(default)]
    pub requests: Option<u64>,
    #[serde(default)]
    pub checks: u64,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub instance: String,
}

/// A deployment request the canary refused. Written with `event: "refused"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename = "refused")]
pub struct DeploymentRefused {
    pub deployment_id: String,
    pub plan_id: Option<String>,
    /// Always `refused`.
    pub status: String,
    pub reason: String,
}

impl DeploymentRefused {
    pub fn new(deployment_id: String, plan_id: Option<String>, reason: String) -> Self {
        Self {
            deployment_id,
            plan_id,
            status: "refused".into(),
            reason,
        }
    }
}

/// Either shape of a `deployment` sample, for readers.
#[derive(Debug, Clone, PartialEq)]
pub enum DeploymentSample {
    /// `event: "refused"`.
    Refused(DeploymentRefused),
    /// Any other event.
    Progress(DeploymentProgress),
}

impl DeploymentSample {
    /// Reads a `deployment` metric: a refusal when its `event` says so,
    /// else progress.
    pub fn from_metric(metric: &Metric) -> Result<Self, MetricBodyError> {
        match metric.body::<DeploymentRefused>() {
            Err(MetricBodyError::WrongTag { .. }) => metric.body().map(Self::Progress),
            other => other.map(Self::Refused),
        }
    }

    pub fn deployment_id(&self) -> &str {
        match self {
            DeploymentSample::Refused(r) => &r.deployment_id,
            DeploymentSample::Progress(p) => &p.deployment_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_tagged_body_writes_its_tag_and_requires_it() {
        let fixing = TaskFixing {
            plan_id: "p".into(),
            path: "a.py".into(),
            attempt: 2,
            failures: 1,
        };
        let v = serde_json::to_value(&fixing).unwrap();
        assert_eq!(
            v,
            json!({"status": "fixing", "plan_id": "p", "path": "a.py", "attempt": 2, "failures": 1})
        );
        let m = Metric::from_body("router", &fixing).unwrap();
        assert_eq!(m.metric_type, MetricType::TaskProgress);
        assert_eq!(m.body::<TaskFixing>().unwrap(), fixing);
        // The same fields under another status are not a fix.
        let mut other = m.clone();
        other.data["status"] = json!("retrying");
        assert!(other.body::<TaskFixing>().is_err());
    }

    #[test]
    fn a_body_of_another_type_is_refused() {
        let m = Metric::from_body("w", &WorkerStatus::default()).unwrap();
        let err = m.body::<QueueStatus>().unwrap_err();
        assert!(matches!(err, MetricBodyError::WrongType { .. }), "{err}");
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_defaults_filled() {
        let m = Metric {
            metric_type: MetricType::WorkerStatus,
            source: "dev-worker@a".into(),
            data: json!({ "slots": 4, "busy": 2, "gpu": "h100" }),
        };
        let w = m.body::<WorkerStatus>().unwrap();
        assert_eq!(
            (w.instance.as_str(), w.slots, w.busy, w.waiting),
            ("", 4, 2, 0)
        );
    }

    #[test]
    fn deployment_samples_tell_refusals_from_progress() {
        let refused = Metric::from_body(
            "canary",
            &DeploymentRefused::new("d".into(), None, "bad spec".into()),
        )
        .unwrap();
        assert_eq!(
            refused.data,
            json!({"event": "refused", "deployment_id": "d", "plan_id": null, "status": "refused", "reason": "bad spec"})
        );
        assert!(matches!(
            DeploymentSample::from_metric(&refused).unwrap(),
            DeploymentSample::Refused(_)
        ));
        let live = Metric {
            metric_type: MetricType::Deployment,
            source: "canary".into(),
            data: json!({ "deployment_id": "d-live", "weight": 50, "stage": 2, "event": "shifted" }),
        };
        let DeploymentSample::Progress(p) = DeploymentSample::from_metric(&live).unwrap() else {
            panic!("progress expected");
        };
        assert_eq!(
            (p.deployment_id.as_str(), p.weight, p.stage),
            ("d-live", 50, 2)
        );
        let anonymous = Metric {
            data: json!({ "weight": 50 }),
            ..live
        };
        assert!(DeploymentSample::from_metric(&anonymous).is_err());
    }

    #[test]
    fn timing_reads_any_body_leniently() {
        let t = Timing::deserialize(&json!({"stage": "qa", "duration_ms": 12, "x": 1})).unwrap();
        assert_eq!(
            t,
            Timing {
                duration_ms: Some(12.0),
                stage: Some("qa".into())
            }
        );
        let t = Timing::deserialize(&json!({"stage": 2, "duration_ms": "slow"})).unwrap();
        assert_eq!(t, Timing::default());
        assert_eq!(Timing::deserialize(&json!({})).unwrap(), Timing::default());
    }
}
