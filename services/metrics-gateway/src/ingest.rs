//! Ingest: broadcast messages in, metric frames out.
//!
//! Listens on `devfleet.metrics.>` (metric samples) and `devfleet.events.>`
//! (pipeline events). Each envelope becomes one `metric` frame: a sample
//! keeps its type; an event is mapped to the type an operator would look
//! for (`task.failed`, `escalation`, `plan.rejected` → `error`;
//! `deploy.requested` → `deployment`; the rest → `task_progress`) with
//! `data.event` naming the kind. The frame is serialized once, recorded in
//! the windows and the latency histograms, and offered to the subscribed
//! clients. A message that does not decode is counted and logged (at most
//! one warning per 10 s), never fatal. Delivery is best effort, as the
//! broadcast itself is.
//!
//! Envelopes carrying a W3C `traceparent` are handled in an `INFO` span
//! attached to that trace, so the gateway's part shows up in the task's
//! trace, and the frame carries the `trace_id`.

use crate::gateway::{Gateway, IngestState};
use crate::protocol::{self, MetricFrame};
use crate::snapshot::Canary;
use axum::extract::ws::Utf8Bytes;
use devfleet_protocol::metrics::{DeploymentSample, Timing, WorkerStatus};
use devfleet_protocol::{Envelope, Message, MetricType};
use serde::Deserialize as _;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest free text (errors, diagnostics) copied into a frame.
const MAX_TEXT_CHARS: usize = 500;

/// Reads one broadcast pattern until shutdown or until the bus closes.
pub(crate) async fn run(
    gateway: Arc<Gateway>,
    mut listener: devfleet_bus::Listener,
    pattern: String,
    shutdown: CancellationToken,
) {
    let mut last_warning: Option<Instant> = None;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = listener.next() => next,
        };
        let Some((subject, payload)) = next else {
            if !shutdown.is_cancelled() {
                tracing::warn!(%pattern, "broadcast listener closed; no more samples from it");
            }
            return;
        };
        match Envelope::decode(&payload) {
            Ok(envelope) => handle(&gateway, &subject, envelope),
            Err(error) => {
                let n = gateway.counters.undecodable.fetch_add(1, Ordering::Relaxed) + 1;
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(%subject, %error, undecodable_total = n, "ignoring undecodable broadcast");
                }
            }
        }
    }
}

/// Handles one decoded envelope: frame, windows, histograms, fan-out.
pub(crate) fn handle(gateway: &Gateway, subject: &str, envelope: Envelope) {
    let span = ingest_span(&envelope);
    let _entered = span.enter();

    let is_event = subject.starts_with(devfleet_protocol::queues::EVENTS_PREFIX);
    if !is_event && !matches!(envelope.message, Message::Metric(_)) {
        gateway.counters.unexpected.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%subject, kind = envelope.kind(), "non-metric message on a metrics subject");
        return;
    }
    let Some((metric_type, frame)) = frame_for(&envelope) else {
        return;
    };
    let now = devfleet_protocol::now_ms();
    gateway
        .windows()
        .record(now, metric_type.as_str(), &frame.data);
    {
        let mut state = gateway.ingest_state();
        *state.frames.entry(metric_type).or_default() += 1;
        if is_event {
            *state.events.entry(envelope.kind()).or_default() += 1;
        }
        learn(&mut state, metric_type, &envelope, &frame);
    }
    let text = Utf8Bytes::from(protocol::to_text(&frame));
    gateway.hub.publish(metric_type, &text);
}

/// The handler span of one envelope: `INFO` and a child of the envelope's
/// trace when it carries a `traceparent` (so it is exported with the
/// task's trace), `DEBUG` otherwise (metric samples carry no trace, and an
/// exported span per sample would only be noise).
fn ingest_span(envelope: &Envelope) -> tracing::Span {
    let plan_id = envelope.plan_id.as_deref().unwrap_or("");
    let task_id = envelope.task_id.as_deref().unwrap_or("");
    let span = if envelope.traceparent.is_some() {
        tracing::info_span!("gateway.ingest", kind = envelope.kind(), plan_id, task_id)
    } else {
        tracing::debug_span!("gateway.ingest", kind = envelope.kind(), plan_id, task_id)
    };
    devfleet_telemetry::set_parent(&span, envelope.traceparent.as_deref());
    span
}

/// Updates histograms and the latest-known workers and deployments.
///
/// Durations come from the [`Timing`] fields any frame may carry; workers
/// and deployments from the typed bodies. A body that does not decode as
/// its type's struct (an older or newer emitter, a hand-made sample) was
/// still forwarded and aggregated; only this bookkeeping skips it.
fn learn(
    state: &mut IngestState,
    metric_type: MetricType,
    envelope: &Envelope,
    frame: &MetricFrame,
) {
    let timing = Timing::deserialize(&frame.data).unwrap_or_default();
    if let Some(ms) = timing.duration_ms {
        let stage = stage_label(timing.stage.as_deref(), envelope.kind(), metric_type);
        state.observe_duration(&stage, ms / 1000.0);
    }
    let ts = frame.timestamp;
    match &envelope.message {
        Message::Metric(metric) if metric.metric_type == MetricType::WorkerStatus => {
            match metric.body::<WorkerStatus>() {
                Ok(mut worker) => {
                    if worker.instance.is_empty() {
                        worker.instance = frame.source.clone();
                    }
                    let instance = worker.instance.clone();
                    IngestState::remember(&mut state.workers, &instance, ts, worker);
                }
                Err(error) => tracing::debug!(%error, "worker_status sample not understood"),
            }
        }
        Message::Metric(metric) if metric.metric_type == MetricType::Deployment => {
            match DeploymentSample::from_metric(metric) {
                Ok(sample) => {
                    let canary = Canary::from_sample(&sample);
                    IngestState::remember(
                        &mut state.deployments,
                        sample.deployment_id(),
                        ts,
                        canary,
                    );
                }
                Err(error) => tracing::debug!(%error, "deployment sample not understood"),
            }
        }
        Message::DeployRequested(request) => {
            let canary = Canary::from_request(request);
            IngestState::remember(&mut state.deployments, &request.deployment_id, ts, canary);
        }
        _ => {}
    }
}

/// The `stage` label of a duration: the sample's own `stage` when it is a
/// short identifier, else derived from the event kind or metric type.
fn stage_label(stage: Option<&str>, kind: &str, metric_type: MetricType) -> String {
    if let Some(stage) = stage {
        if !stage.is_empty()
            && stage.len() <= 32
            && stage
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return stage.to_owned();
        }
    }
    match kind {
        "task.built" => "dev".into(),
        "qa.result" => "qa".into(),
        "integration.result" => "integration".into(),
        _ => metric_type.as_str().into(),
    }
}

/// The frame for one envelope, or `None` for a kind that carries nothing
/// an operator watches.
pub fn frame_for(envelope: &Envelope) -> Option<(MetricType, MetricFrame)> {
    let trace_id = envelope
        .traceparent
        .as_deref()
        .and_then(devfleet_telemetry::parse_traceparent)
        .map(|t| t.trace_id);
    let (metric_type, source, data) = match &envelope.message {
        Message::Metric(m) => (m.metric_type, m.source.clone(), m.data.clone()),
        other => {
            let (metric_type, mut data) = event_data(other);
            if let Value::Object(map) = &mut data {
                map.insert("event".into(), Value::String(other.kind().into()));
            }
            (metric_type, "event".to_owned(), data)
        }
    };
    let data = match data {
        Value::Object(_) => data,
        // Data is documented as an object; wrap anything else.
        other => json!({ "value": other }),
    };
    Some((
        metric_type,
        MetricFrame {
            kind: "metric".into(),
            metric_type: metric_type.as_str().into(),
            timestamp: envelope.timestamp_ms,
            source,
            data,
            trace_id,
        },
    ))
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_TEXT_CHARS {
        s.to_owned()
    } else {
        s.chars().take(MAX_TEXT_CHARS).collect::<String>() + "…"
    }
}

/// The metric type and data of an event.
fn event_data(message: &Message) -> (MetricType, Value) {
    use MetricType::{Deployment, Error, SystemHealth, TaskProgress};
    match message {
        Message::PlanSubmitted(m) => (
            TaskProgress,
            json!({ "plan_id": m.plan_id, "name": m.plan.name, "tasks": m.plan.tasks.len() }),
        ),
        Message::PlanAnalyzed(m) => (
            TaskProgress,
            json!({
                "plan_id": m.plan_id,
                "name": m.plan.name,
                "tasks": m.tasks.len(),
                "critical_path_length": m.critical_path_length,
            }),
        ),
        Message::PlanRejected(m) => (
            Error,
            json!({ "plan_id": m.plan_id, "name": m.name, "error": truncate(&m.error) }),
        ),
        Message::PlanEvent(m) => (
            TaskProgress,
            json!({
                "plan_id": m.plan_id,
                "name": m.name,
                "status": m.status.as_str(),
                "done": m.done,
                "failed": m.failed,
                "total": m.total,
                "message": m.message.as_deref().map(truncate),
            }),
        ),
        Message::TaskWork(m) => (
            TaskProgress,
            json!({ "plan_id": m.plan_id, "path": m.path, "attempt": m.attempt, "class": m.class.as_str() }),
        ),
        Message::TaskBuilt(m) => (
            TaskProgress,
            json!({
                "plan_id": m.plan_id,
                "path": m.path,
                "attempt": m.attempt,
                "cache_hit": m.cache_hit,
                "executor": m.executor,
                "duration_ms": m.duration_ms,
            }),
        ),
        Message::TaskFailed(m) => (
            Error,
            json!({
                "plan_id": m.plan_id,
                "path": m.path,
                "attempt": m.attempt,
                "stage": m.stage.as_str(),
                "error": truncate(&m.error),
                "retryable": m.retryable,
            }),
        ),
        Message::QaWork(m) => (
            TaskProgress,
            json!({ "plan_id": m.plan_id, "path": m.path, "attempt": m.attempt }),
        ),
        Message::QaResult(m) => (
            TaskProgress,
            json!({
                "plan_id": m.plan_id,
                "path": m.path,
                "attempt": m.attempt,
                "passed": m.passed,
                "checks": m.checks.iter().map(|c| json!({
                    "name": c.name, "status": c.status, "duration_ms": c.duration_ms,
                })).collect::<Vec<_>>(),
                "diagnostics": truncate(&m.diagnostics),
            }),
        ),
        Message::TaskDone(m) => (
            TaskProgress,
            json!({ "plan_id": m.plan_id, "path": m.path, "attempt": m.attempt }),
        ),
        Message::TaskFinallyFailed(m) => (
            Error,
            json!({
                "plan_id": m.plan_id,
                "path": m.path,
                "attempt": m.attempt,
                "reason": truncate(&m.reason),
                "dlq_id": m.dlq_id,
            }),
        ),
        Message::Escalation(m) => (
            Error,
            json!({
                "plan_id": m.plan_id,
                "path": m.path,
                "reason": truncate(&m.reason),
                "attempts": m.history.len(),
                "last_error": m.history.last().map(|a| truncate(&a.error)),
            }),
        ),
        Message::IntegrationWork(m) => (
            TaskProgress,
            json!({
                "plan_id": m.plan_id,
                "step": m.step.name,
                "shard_index": m.shard_index,
                "shard_count": m.shard_count,
            }),
        ),
        Message::IntegrationResult(m) => (
            if m.passed { TaskProgress } else { Error },
            json!({
                "plan_id": m.plan_id,
                "step": m.step,
                "shard_index": m.shard_index,
                "shard_count": m.shard_count,
                "passed": m.passed,
                "duration_ms": m.duration_ms,
                "output": truncate(&m.output),
            }),
        ),
        Message::DeployRequested(m) => (
            Deployment,
            json!({
                "deployment_id": m.deployment_id,
                "plan_id": m.plan_id,
                "stages": m.spec.stages,
                "status": "requested",
            }),
        ),
        Message::DeployFinished(m) => (
            Deployment,
            json!({
                "deployment_id": m.deployment_id,
                "plan_id": m.plan_id,
                "status": if m.promoted { "promoted" } else { "rolled_back" },
                "message": truncate(&m.message),
            }),
        ),
        Message::BreakerChanged(m) => (
            SystemHealth,
            json!({
                "breaker": m.stage.as_str(),
                "state": m.state,
                "reason": truncate(&m.reason),
                "error_rate": m.error_rate,
                "volume": m.volume,
            }),
        ),
        Message::Metric(m) => (m.metric_type, m.data.clone()),
        // Kinds added to the protocol later still reach clients, with their ids.
        #[allow(unreachable_patterns)]
        other => {
            let (plan_id, task_id) = other.ids();
            (TaskProgress, json!({ "plan_id": plan_id, "path": task_id }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::{Metric, Stage, TaskDone, TaskFailed};

    #[test]
    fn a_metric_keeps_its_type_source_and_data() {
        let env = Envelope::new(Metric {
            metric_type: MetricType::Performance,
            source: "dev-worker@a".into(),
            data: json!({ "duration_ms": 12 }),
        });
        let (t, f) = frame_for(&env).unwrap();
        assert_eq!(t, MetricType::Performance);
        let v: Value = serde_json::from_str(&protocol::to_text(&f)).unwrap();
        assert_eq!(v["type"], "metric");
        assert_eq!(v["metric_type"], "performance");
        assert_eq!(v["timestamp"], env.timestamp_ms);
        assert_eq!(v["source"], "dev-worker@a");
        assert_eq!(v["data"]["duration_ms"], 12);
        assert!(v.get("trace_id").is_none());
    }

    #[test]
    fn a_failure_event_is_an_error_frame_with_its_trace() {
        let env = Envelope::new(TaskFailed {
            plan_id: "p".into(),
            path: "a.py".into(),
            attempt: 2,
            stage: Stage::Dev,
            error: "x".repeat(2000),
            retryable: true,
        })
        .with_traceparent(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        ));
        let (t, f) = frame_for(&env).unwrap();
        assert_eq!(t, MetricType::Error);
        assert_eq!(f.data["event"], "task.failed");
        assert_eq!(f.data["path"], "a.py");
        assert!(f.data["error"].as_str().unwrap().chars().count() <= MAX_TEXT_CHARS + 1);
        assert_eq!(
            f.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn non_object_data_is_wrapped() {
        let env = Envelope::new(Metric {
            metric_type: MetricType::SystemHealth,
            source: "s".into(),
            data: json!(3),
        });
        assert_eq!(frame_for(&env).unwrap().1.data, json!({ "value": 3 }));
    }

    #[test]
    fn ingest_span_joins_the_envelope_trace() {
        // The gateway's handler span must be a child of the publisher's
        // span, so the task's trace includes the gateway.
        devfleet_telemetry::init_for_tests();
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let env = Envelope::new(TaskDone {
            plan_id: "p".into(),
            path: "a.py".into(),
            attempt: 1,
            artifact: "aa".into(),
        })
        .with_traceparent(Some(header.into()));
        let inside = ingest_span(&env)
            .in_scope(devfleet_telemetry::current_traceparent)
            .and_then(|h| devfleet_telemetry::parse_traceparent(&h))
            .unwrap();
        assert_eq!(inside.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(inside.span_id, "00f067aa0ba902b7");
    }

    #[test]
    fn workers_deployments_and_durations_are_learned_from_typed_bodies() {
        use devfleet_protocol::metrics::{BuildTiming, DeploymentProgress, DeploymentRefused};
        let mut state = IngestState::new();
        let mut ingest = |envelope: Envelope| {
            let (t, f) = frame_for(&envelope).unwrap();
            learn(&mut state, t, &envelope, &f);
        };
        // A worker sample without an instance is known by its source.
        let worker = WorkerStatus {
            slots: 4,
            busy: 1,
            waiting: 2,
            ..WorkerStatus::default()
        };
        ingest(Envelope::new(
            Metric::from_body("dev-worker@a", &worker).unwrap(),
        ));
        // A sample that is no WorkerStatus is skipped, not fatal.
        ingest(Envelope::new(Metric {
            metric_type: MetricType::WorkerStatus,
            source: "dev-worker@odd".into(),
            data: json!({ "slots": "many" }),
        }));
        let refused = DeploymentRefused::new("d-1".into(), Some("p".into()), "bad spec".into());
        ingest(Envelope::new(
            Metric::from_body("canary", &refused).unwrap(),
        ));
        let progress = DeploymentProgress {
            deployment_id: "d-2".into(),
            status: "running".into(),
            stage: 1,
            stages: 3,
            weight: 25,
            ..DeploymentProgress::default()
        };
        ingest(Envelope::new(
            Metric::from_body("canary", &progress).unwrap(),
        ));
        let timing = BuildTiming {
            plan_id: "p".into(),
            path: "a.py".into(),
            duration_ms: 1500,
            cache_hit: false,
            executor: "builtin".into(),
            instance: "dev-worker@a".into(),
        };
        ingest(Envelope::new(
            Metric::from_body("dev-worker@a", &timing).unwrap(),
        ));

        assert_eq!(state.workers.len(), 1);
        let (_, w) = &state.workers["dev-worker@a"];
        assert_eq!((w.slots, w.busy, w.waiting), (4, 1, 2));
        let (_, d1) = &state.deployments["d-1"];
        assert_eq!(d1.status.as_deref(), Some("refused"));
        assert_eq!(d1.reason.as_deref(), Some("bad spec"));
        assert_eq!(d1.weight, None);
        let (_, d2) = &state.deployments["d-2"];
        assert_eq!(d2.weight, Some(25.0));
        assert_eq!(
            (d2.stage.clone(), d2.stages.clone()),
            (Some(json!(1)), Some(json!(3)))
        );
        assert_eq!(d2.status.as_deref(), Some("running"));
        assert_eq!(
            state.durations.keys().collect::<Vec<_>>(),
            ["performance"],
            "a build timing has no stage: labelled by its type"
        );
    }

    #[test]
    fn stage_labels_are_sanitised() {
        assert_eq!(
            stage_label(Some("analyze"), "metric", MetricType::Performance),
            "analyze"
        );
        assert_eq!(
            stage_label(Some("bad label\n"), "task.built", MetricType::TaskProgress),
            "dev"
        );
        assert_eq!(
            stage_label(None, "metric", MetricType::Performance),
            "performance"
        );
    }
}
