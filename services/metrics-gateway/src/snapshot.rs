//! The poller: a periodic read of the store and the bus into a
//! [`Snapshot`], which `/metrics` and `/api/overview` serve without
//! touching the store, so scrapes stay cheap however often they come.
//!
//! What is read each `poll_interval` (collections and counters are read
//! under their plain name and, with a namespace, also as `namespace.name`,
//! the rule the work queues follow, since services use either):
//!
//! * the depth of every work queue (`queues::ALL_WORK_QUEUES`) and of the
//!   dead-letter queue;
//! * every plan; the tasks of the newest `max_tracked_plans` unfinished
//!   plans (finished plans count from their record);
//! * the ready-set size; the counters `cache_hits`, `cache_misses` and
//!   `scheduler.tasks_completed`; the fleet's usage (tokens, cost, calls)
//!   per model;
//! * the collections `workers` (dev-worker capacity records), `breaker`,
//!   `canary` and `dlq` (the router's dead-letter index).
//!
//! Between two polls a task of a tracked plan that changed state is
//! announced as a `task_progress` frame with `event: "task_state"`, so the
//! dashboard and `devfleet watch` see every transition the store makes,
//! whichever service made it.

use crate::gateway::Gateway;
use crate::protocol::{self, MetricFrame};
use axum::extract::ws::Utf8Bytes;
use devfleet_protocol::metrics::DeploymentSample;
use devfleet_protocol::{queues, DeployRequested, MetricType};
use devfleet_store::{TaskRecord, TaskState, UsageTotals};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest a single store or bus read may take before the poll moves on.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Plans listed in the snapshot (newest first).
const LISTED_PLANS: usize = 50;
/// Dead-letter entries kept in the snapshot (newest first).
const RECENT_DLQ: usize = 20;
/// Breakers and canary deployments reported (label cardinality bound).
const MAX_ENTRIES: usize = 50;

/// Store collections and counters the gateway reads (before namespacing).
pub mod names {
    pub const WORKERS: &str = "workers";
    pub const BREAKER: &str = "breaker";
    pub const CANARY: &str = "canary";
    pub const DLQ: &str = "dlq";
    pub const CACHE_HITS: &str = "cache_hits";
    pub const CACHE_MISSES: &str = "cache_misses";
    pub const TASKS_COMPLETED: &str = "scheduler.tasks_completed";
}

/// What the last poll saw. Fields are `None`/empty when that read failed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// When the poll finished (ms since the epoch); 0 before the first.
    pub taken_ms: i64,
    pub queues: Vec<QueueDepth>,
    pub dlq_depth: Option<u64>,
    pub ready: Option<u64>,
    pub plans_by_status: BTreeMap<String, u64>,
    pub tasks_by_state: BTreeMap<String, u64>,
    /// Newest plans first.
    pub plans: Vec<PlanSummary>,
    pub workers: Workers,
    pub cache_hits: Option<i64>,
    pub cache_misses: Option<i64>,
    pub tasks_completed: Option<i64>,
    /// Tokens, cost and calls of executor runs per model, fleet-wide
    /// (`TaskStore::usage_by_model`).
    pub usage: BTreeMap<String, UsageTotals>,
    pub breakers: Vec<Breaker>,
    pub canaries: Vec<Canary>,
    /// Dead-letter index entries, newest first.
    pub dlq: Vec<DlqEntry>,
    pub dlq_entries: usize,
    /// Reads that failed in the last poll.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueDepth {
    pub queue: String,
    pub depth: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    pub id: String,
    pub name: String,
    pub status: String,
    pub total: u32,
    pub done: u32,
    pub failed: u32,
    pub blocked: u32,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub message: Option<String>,
}

/// Dev-worker capacity, summed over live workers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Workers {
    pub workers: u32,
    pub slots: u64,
    pub busy: u64,
    pub waiting: u64,
    /// `store` (capacity records) or `metrics` (recent `worker_status`
    /// samples, used when no record exists).
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Breaker {
    pub name: String,
    /// `closed`, `open`, `half_open`, or `unknown`.
    pub state: String,
    pub detail: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Canary {
    pub id: String,
    /// Traffic on the new version, percent.
    pub weight: Option<f64>,
    /// Index of the current stage.
    pub stage: Option<Value>,
    /// The stage weights (or their number).
    pub stages: Option<Value>,
    pub status: Option<String>,
    pub plan_id: Option<String>,
    pub reason: Option<String>,
    pub updated_ms: Option<i64>,
}

impl Canary {
    /// What a `deployment` sample says about its deployment. An empty
    /// status and zero stages (defaults of an older or partial emitter)
    /// read as unknown.
    pub fn from_sample(sample: &DeploymentSample) -> Canary {
        let known = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        match sample {
            DeploymentSample::Progress(p) => Canary {
                id: p.deployment_id.clone(),
                weight: Some(f64::from(p.weight)),
                stage: Some(json!(p.stage)),
                stages: (p.stages > 0).then(|| json!(p.stages)),
                status: known(&p.status),
                plan_id: p.plan_id.clone(),
                reason: p.reason.clone(),
                updated_ms: None,
            },
            DeploymentSample::Refused(r) => Canary {
                id: r.deployment_id.clone(),
                weight: None,
                stage: None,
                stages: None,
                status: known(&r.status),
                plan_id: r.plan_id.clone(),
                reason: Some(r.reason.clone()),
                updated_ms: None,
            },
        }
    }

    /// A deployment as requested, before the canary reports on it.
    pub fn from_request(request: &DeployRequested) -> Canary {
        Canary {
            id: request.deployment_id.clone(),
            weight: None,
            stage: None,
            stages: Some(json!(request.spec.stages)),
            status: Some("requested".into()),
            plan_id: request.plan_id.clone(),
            reason: None,
            updated_ms: None,
        }
    }
}

/// The operator-facing part of a dead-letter index entry (payloads and
/// histories stay in the store; `devfleet dlq list` shows them).
#[derive(Debug, Clone, Serialize)]
pub struct DlqEntry {
    pub key: String,
    pub at_ms: Option<i64>,
    pub source: Option<String>,
    pub plan_id: Option<String>,
    pub path: Option<String>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    pub attempts: Option<u64>,
    pub reason: Option<String>,
}

/// Polls until shutdown: one poll at once, then every `poll_interval`.
pub(crate) async fn run(gateway: Arc<Gateway>, shutdown: CancellationToken) {
    let mut tracker = StateTracker::default();
    let mut tick = tokio::time::interval(gateway.config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = poll(&gateway, &mut tracker) => s,
        };
        let now = devfleet_protocol::now_ms();
        gateway.windows().prune(now);
        gateway
            .ingest_state()
            .expire(now, gateway.config.window.window);
        gateway.set_snapshot(snapshot);
    }
}

async fn read<T, E: std::fmt::Display>(
    what: &str,
    errors: &mut Vec<String>,
    fut: impl Future<Output = Result<T, E>>,
) -> Option<T> {
    match tokio::time::timeout(READ_TIMEOUT, fut).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            errors.push(format!("{what}: {e}"));
            None
        }
        Err(_) => {
            errors.push(format!("{what}: no answer within {READ_TIMEOUT:?}"));
            None
        }
    }
}

/// One poll of the store and bus.
async fn poll(gateway: &Gateway, tracker: &mut StateTracker) -> Snapshot {
    let c = &gateway.connections;
    let store = c.store.as_ref();
    let mut errors = Vec::new();
    let mut s = Snapshot::default();

    for queue in queues::ALL_WORK_QUEUES {
        let depth = read(
            &format!("depth of {queue}"),
            &mut errors,
            c.queue_depth(queue),
        )
        .await;
        s.queues.push(QueueDepth {
            queue: (*queue).to_owned(),
            depth,
        });
    }
    s.dlq_depth = read(
        "depth of the dead-letter queue",
        &mut errors,
        c.queue_depth(devfleet_bus::DEAD_LETTER_QUEUE),
    )
    .await;
    s.ready = read("ready set", &mut errors, store.ready_len()).await;

    if let Some(plans) = read("plans", &mut errors, store.plans()).await {
        let mut tracked = Vec::new();
        for plan in &plans {
            *s.plans_by_status
                .entry(plan.status.as_str().to_owned())
                .or_default() += 1;
            if !plan.status.is_final() && tracked.len() < gateway.config.max_tracked_plans {
                tracked.push(plan.id.clone());
            } else {
                // Counts from the record; whatever is neither done, failed
                // nor blocked in a finished plan never ran.
                let mut add = |state: &str, n: u32| {
                    *s.tasks_by_state.entry(state.to_owned()).or_default() += u64::from(n);
                };
                add("done", plan.done);
                add("failed", plan.failed);
                add("blocked", plan.blocked);
                add(
                    "pending",
                    plan.total
                        .saturating_sub(plan.done + plan.failed + plan.blocked),
                );
            }
        }
        s.plans = plans
            .iter()
            .take(LISTED_PLANS)
            .map(|p| PlanSummary {
                id: p.id.clone(),
                name: p.name.clone(),
                status: p.status.as_str().to_owned(),
                total: p.total,
                done: p.done,
                failed: p.failed,
                blocked: p.blocked,
                created_ms: p.created_ms,
                updated_ms: p.updated_ms,
                message: p.message.clone(),
            })
            .collect();
        let mut seen = Vec::new();
        for plan_id in &tracked {
            let what = format!("tasks of plan {plan_id}");
            let Some(tasks) = read(&what, &mut errors, store.tasks(plan_id)).await else {
                continue;
            };
            for t in &tasks {
                *s.tasks_by_state
                    .entry(t.state.as_str().to_owned())
                    .or_default() += 1;
            }
            for frame in tracker.observe(plan_id, &tasks) {
                gateway.hub.publish(
                    MetricType::TaskProgress,
                    &Utf8Bytes::from(protocol::to_text(&frame)),
                );
            }
            seen.push(plan_id.clone());
        }
        tracker.retain(&seen);
    }
    // Every state appears, so dashboards and alerts see zeros, not gaps.
    for state in [
        TaskState::Pending,
        TaskState::Ready,
        TaskState::Leased,
        TaskState::Built,
        TaskState::Done,
        TaskState::Failed,
        TaskState::Blocked,
    ] {
        s.tasks_by_state
            .entry(state.as_str().to_owned())
            .or_default();
    }

    s.cache_hits = read_counter(gateway, names::CACHE_HITS, &mut errors).await;
    s.cache_misses = read_counter(gateway, names::CACHE_MISSES, &mut errors).await;
    s.tasks_completed = read_counter(gateway, names::TASKS_COMPLETED, &mut errors).await;
    let store = gateway.connections.store.as_ref();
    if let Some(usage) = read("usage by model", &mut errors, store.usage_by_model()).await {
        s.usage = usage.into_iter().take(MAX_ENTRIES).collect();
    }

    let now = devfleet_protocol::now_ms();
    let workers = read_collection(gateway, names::WORKERS, &mut errors).await;
    s.workers = workers_from(workers.as_deref().unwrap_or(&[]), now);
    if s.workers.workers == 0 {
        s.workers = workers_from_samples(gateway);
    }
    if let Some(records) = read_collection(gateway, names::BREAKER, &mut errors).await {
        s.breakers = records
            .iter()
            .take(MAX_ENTRIES)
            .map(|(k, v)| breaker_from(k, v))
            .collect();
    }
    let canaries = read_collection(gateway, names::CANARY, &mut errors).await;
    s.canaries = canaries_from(canaries.as_deref().unwrap_or(&[]), gateway);
    if let Some(records) = read_collection(gateway, names::DLQ, &mut errors).await {
        s.dlq_entries = records.len();
        s.dlq = recent_dlq(&records);
    }

    if !errors.is_empty() {
        gateway
            .counters
            .poll_errors
            .fetch_add(errors.len() as u64, Ordering::Relaxed);
        tracing::debug!(errors = ?errors, "poll had failed reads");
    }
    s.errors = errors;
    s.taken_ms = devfleet_protocol::now_ms();
    s
}

/// The plain and (with a namespace) namespaced names of a collection.
fn store_names(gateway: &Gateway, name: &str) -> Vec<String> {
    let namespaced = gateway.store_name(name);
    if namespaced == name {
        vec![name.to_owned()]
    } else {
        vec![name.to_owned(), namespaced]
    }
}

/// A collection under both names, merged by key (the namespaced one wins).
async fn read_collection(
    gateway: &Gateway,
    name: &str,
    errors: &mut Vec<String>,
) -> Option<Vec<(String, String)>> {
    let store = gateway.connections.store.as_ref();
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    let mut any = false;
    for n in store_names(gateway, name) {
        if let Some(records) = read(&format!("collection {n}"), errors, store.kv_list(&n)).await {
            any = true;
            merged.extend(records);
        }
    }
    any.then(|| merged.into_iter().collect())
}

/// A counter under both names, summed (a service uses one of them).
async fn read_counter(gateway: &Gateway, name: &str, errors: &mut Vec<String>) -> Option<i64> {
    let store = gateway.connections.store.as_ref();
    let mut total = None;
    for n in store_names(gateway, name) {
        if let Some(v) = read(&format!("counter {n}"), errors, store.counter(&n)).await {
            total = Some(total.unwrap_or(0) + v);
        }
    }
    total
}

fn text_field(detail: &Value, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| {
        detail
            .get(*k)
            .and_then(Value::as_str)
            .map(|s| s.chars().take(300).collect())
    })
}

fn parse(v: &str) -> Value {
    serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()))
}

fn workers_from(records: &[(String, String)], now_ms: i64) -> Workers {
    let mut w = Workers {
        source: "store".into(),
        ..Workers::default()
    };
    for (_, v) in records {
        let v = parse(v);
        if v.get("expires_ms")
            .and_then(Value::as_i64)
            .is_some_and(|e| e < now_ms)
        {
            continue;
        }
        w.workers += 1;
        w.slots += v.get("slots").and_then(Value::as_u64).unwrap_or(0);
        w.busy += v.get("busy").and_then(Value::as_u64).unwrap_or(0);
        w.waiting += v.get("waiting").and_then(Value::as_u64).unwrap_or(0);
    }
    w
}

fn workers_from_samples(gateway: &Gateway) -> Workers {
    let state = gateway.ingest_state();
    let mut w = Workers {
        source: "metrics".into(),
        ..Workers::default()
    };
    for (_, sample) in state.workers.values() {
        w.workers += 1;
        w.slots += sample.slots;
        w.busy += sample.busy;
        w.waiting += sample.waiting;
    }
    w
}

/// A breaker record: JSON with a `state` field, or the bare state.
fn breaker_from(name: &str, value: &str) -> Breaker {
    let detail = parse(value);
    let raw = match &detail {
        Value::String(s) => s.clone(),
        v => v
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    };
    let state = match raw.to_ascii_lowercase().replace(['-', ' '], "_").as_str() {
        "closed" => "closed",
        "open" => "open",
        "half_open" | "halfopen" => "half_open",
        _ => "unknown",
    };
    Breaker {
        name: name.to_owned(),
        state: state.to_owned(),
        detail,
    }
}

/// Canary deployments: the store's records, plus deployments only seen in
/// recent `deployment` samples.
fn canaries_from(records: &[(String, String)], gateway: &Gateway) -> Vec<Canary> {
    let canary = |id: &str, detail: &Value| {
        let num = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| detail.get(*k).and_then(Value::as_f64))
        };
        Canary {
            id: id.to_owned(),
            weight: num(&["weight", "current_weight", "traffic_weight"]),
            stage: ["stage", "stage_index"]
                .iter()
                .find_map(|k| detail.get(*k).cloned()),
            stages: detail
                .get("spec")
                .and_then(|s| s.get("stages"))
                .or_else(|| detail.get("stages"))
                .cloned(),
            status: text_field(detail, &["status", "state"]),
            plan_id: text_field(detail, &["plan_id"]),
            reason: text_field(detail, &["reason", "last_error"]),
            updated_ms: ["updated_ms", "at_ms"]
                .iter()
                .find_map(|k| detail.get(*k).and_then(Value::as_i64)),
        }
    };
    let mut out: Vec<Canary> = records.iter().map(|(k, v)| canary(k, &parse(v))).collect();
    // Newest first, so the bound keeps the ones that matter.
    out.sort_by_key(|c| std::cmp::Reverse(c.updated_ms));
    let state = gateway.ingest_state();
    let mut live: Vec<_> = state.deployments.iter().collect();
    live.sort_by_key(|(_, (t, _))| std::cmp::Reverse(*t));
    for (id, (at_ms, live)) in live {
        if !out.iter().any(|c| &c.id == id) {
            let mut c = live.clone();
            c.updated_ms = c.updated_ms.or(Some(*at_ms));
            out.push(c);
        }
    }
    out.truncate(MAX_ENTRIES);
    out
}

fn recent_dlq(records: &[(String, String)]) -> Vec<DlqEntry> {
    let mut entries: Vec<DlqEntry> = records
        .iter()
        .map(|(k, v)| {
            let detail = parse(v);
            DlqEntry {
                key: k.clone(),
                at_ms: ["at_ms", "dead_lettered_ms", "timestamp"]
                    .iter()
                    .find_map(|f| detail.get(*f).and_then(Value::as_i64)),
                source: text_field(&detail, &["source"]),
                plan_id: text_field(&detail, &["plan_id"]),
                path: text_field(&detail, &["path"]),
                kind: text_field(&detail, &["kind"]),
                queue: text_field(&detail, &["queue"]),
                attempts: detail.get("attempts").and_then(Value::as_u64),
                reason: text_field(&detail, &["reason", "error"])
                    .or_else(|| detail.as_str().map(|s| s.chars().take(300).collect())),
            }
        })
        .collect();
    entries.sort_by(|a, b| b.at_ms.cmp(&a.at_ms).then_with(|| b.key.cmp(&a.key)));
    entries.truncate(RECENT_DLQ);
    entries
}

/// Remembers each tracked task's state to announce changes.
#[derive(Debug, Default)]
struct StateTracker {
    plans: HashMap<String, HashMap<String, (TaskState, u32)>>,
}

impl StateTracker {
    /// Frames for every task whose state or attempt changed since the last
    /// observation of its plan (none on the first observation).
    fn observe(&mut self, plan_id: &str, tasks: &[TaskRecord]) -> Vec<MetricFrame> {
        let now = devfleet_protocol::now_ms();
        let first = !self.plans.contains_key(plan_id);
        let known = self.plans.entry(plan_id.to_owned()).or_default();
        let mut frames = Vec::new();
        for t in tasks {
            let current = (t.state, t.attempt);
            let previous = known.insert(t.path.clone(), current);
            if first || previous == Some(current) {
                continue;
            }
            frames.push(MetricFrame {
                kind: "metric".into(),
                metric_type: MetricType::TaskProgress.as_str().into(),
                timestamp: now,
                source: "metrics-gateway".into(),
                data: json!({
                    "event": "task_state",
                    "plan_id": plan_id,
                    "path": t.path,
                    "state": t.state.as_str(),
                    "previous": previous.map(|(s, _)| s.as_str()),
                    "attempt": t.attempt,
                }),
                trace_id: None,
            });
        }
        frames
    }

    /// Forgets plans no longer tracked.
    fn retain(&mut self, plan_ids: &[String]) {
        self.plans.retain(|id, _| plan_ids.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::TaskClass;

    fn task(path: &str, state: TaskState, attempt: u32) -> TaskRecord {
        TaskRecord {
            plan_id: "p".into(),
            path: path.into(),
            spec: String::new(),
            content: None,
            depends_on: vec![],
            dependents: vec![],
            priority: 0,
            estimate: 1,
            executor: None,
            state,
            class: TaskClass::New,
            attempt,
            lease_owner: None,
            lease_expires_ms: None,
            artifact: None,
            error: None,
            updated_ms: 0,
        }
    }

    #[test]
    fn tracker_announces_only_changes_after_the_first_look() {
        let mut t = StateTracker::default();
        assert!(t
            .observe(
                "p",
                &[
                    task("a", TaskState::Ready, 0),
                    task("b", TaskState::Pending, 0)
                ]
            )
            .is_empty());
        let frames = t.observe(
            "p",
            &[
                task("a", TaskState::Leased, 1),
                task("b", TaskState::Pending, 0),
            ],
        );
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].data["path"], "a");
        assert_eq!(frames[0].data["state"], "leased");
        assert_eq!(frames[0].data["previous"], "ready");
        t.retain(&[]);
        assert!(t.plans.is_empty());
    }

    #[test]
    fn breaker_records_in_either_shape() {
        assert_eq!(
            breaker_from("dispatch", r#"{"state":"open","opened_ms":1}"#).state,
            "open"
        );
        assert_eq!(breaker_from("dispatch", "half-open").state, "half_open");
        assert_eq!(
            breaker_from("dispatch", r#"{"state":"Closed"}"#).state,
            "closed"
        );
        assert_eq!(breaker_from("dispatch", "weird").state, "unknown");
    }

    #[test]
    fn workers_skip_expired_records() {
        let records = vec![
            (
                "a".to_owned(),
                r#"{"slots":4,"busy":2,"waiting":1,"at_ms":0,"expires_ms":100}"#.to_owned(),
            ),
            (
                "b".to_owned(),
                r#"{"slots":3,"busy":0,"waiting":0,"at_ms":0,"expires_ms":10}"#.to_owned(),
            ),
        ];
        let w = workers_from(&records, 50);
        assert_eq!((w.workers, w.slots, w.busy, w.waiting), (1, 4, 2, 1));
    }

    #[test]
    fn dlq_entries_newest_first_and_bounded() {
        let records: Vec<_> = (0..30)
            .map(|i| {
                (
                    format!("k{i:02}"),
                    format!(r#"{{"at_ms":{i},"reason":"r"}}"#),
                )
            })
            .collect();
        let recent = recent_dlq(&records);
        assert_eq!(recent.len(), RECENT_DLQ);
        assert_eq!(recent[0].key, "k29");
        assert_eq!(recent[0].reason.as_deref(), Some("r"));
    }
}
