//! Golden bytes of the wire format, and rolling-upgrade compatibility.
//!
//! * Every message kind is encoded in a fixed envelope and compared with the
//!   checked-in bytes under `tests/golden/envelope/<kind>.hex`; the golden
//!   bytes must decode back to the same envelope. A change to these bytes is
//!   a wire change: it must follow the compatibility rule in the crate docs.
//! * Every metric body is compared with `tests/golden/metrics/<Body>.json`,
//!   the JSON the gateway forwards to WebSocket clients, and read back.
//! * Messages written by a newer version (an extra field anywhere) and by an
//!   older one (a defaulted field missing) still decode.
//!
//! After an intended, compatible change, regenerate the files with
//! `DEVFLEET_BLESS_GOLDEN=1 cargo test -p devfleet-protocol --test golden`
//! and review the diff.

use devfleet_protocol::metrics::*;
use devfleet_protocol::*;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::PathBuf;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn blessing() -> bool {
    std::env::var_os("DEVFLEET_BLESS_GOLDEN").is_some()
}

/// Compares `actual` with the file, or writes it when blessing.
fn check_file(relative: &str, actual: &str) {
    let path = golden_dir().join(relative);
    if blessing() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with DEVFLEET_BLESS_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} changed: the wire format moved (see the crate's compatibility rule)",
        path.display()
    );
}

fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    for line in bytes.chunks(32) {
        for b in line {
            out.push_str(&format!("{b:02x}"));
        }
        out.push('\n');
    }
    out
}

fn from_hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn plan() -> Plan {
    Plan {
        requires: Vec::new(),
        name: "golden".into(),
        base: Some("base/".into()),
        base_snapshot: None,
        executor: Some(ExecutorKind::Builtin),
        tasks: vec![
            TaskDef {
                requires: Vec::new(),
                path: "a.py".into(),
                spec: "the a module".into(),
                content: Some("A = 1\n".into()),
                depends_on: vec![],
                estimate: Some(3),
                executor: None,
                writes: Vec::new(),
            },
            TaskDef {
                requires: Vec::new(),
                path: "b.py".into(),
                spec: "uses a".into(),
                content: None,
                depends_on: vec!["a.py".into()],
                estimate: None,
                executor: Some(ExecutorKind::Builtin),
                writes: Vec::new(),
            },
        ],
        integration: vec![step()],
        deploy: Some(deploy_spec()),
        budget: None,
    }
}

fn step() -> IntegrationStep {
    IntegrationStep {
        requires: Vec::new(),
        name: "pytest".into(),
        run: "pytest -q".into(),
        shard: Some(2),
        timeout_seconds: Some(60),
    }
}

fn deploy_spec() -> DeploySpec {
    DeploySpec {
        stages: vec![10, 50, 100],
        stage_seconds: 30,
        check_seconds: 5,
        shift: Handler::profile("lb").param("pool", "web"),
        rollback: Some(Handler::profile("lb-reset")),
        health: HealthSource::Url {
            url: "http://127.0.0.1:9/health".into(),
        },
        thresholds: Thresholds {
            degraded_error_rate: 0.01,
            rollback_error_rate: 0.05,
            max_latency_ms: 250.5,
        },
    }
}

/// One fixed value of every message kind.
fn messages() -> Vec<Message> {
    vec![
        Message::PlanSubmitted(PlanSubmitted {
            plan_id: "p-1".into(),
            plan: plan(),
        }),
        Message::PlanAnalyzed(PlanAnalyzed {
            plan_id: "p-1".into(),
            plan: plan(),
            tasks: vec![AnalyzedTask {
                path: "b.py".into(),
                spec: "uses a".into(),
                content: Some("import a\n".into()),
                depends_on: vec!["a.py".into()],
                estimate: 2,
                priority: 5,
                batch: 1,
                executor: Some(ExecutorKind::Builtin),
                base_imports: Vec::new(),
            }],
            critical_path_length: 5,
            critical_path: vec!["a.py".into(), "b.py".into()],
        }),
        Message::PlanRejected(PlanRejected {
            plan_id: "p-1".into(),
            name: "golden".into(),
            error: "cycle: a.py -> b.py -> a.py".into(),
        }),
        Message::PlanEvent(PlanEvent {
            plan_id: "p-1".into(),
            name: "golden".into(),
            status: PlanStatus::Running,
            done: 1,
            failed: 0,
            total: 2,
            message: Some("a.py done".into()),
        }),
        Message::TaskWork(TaskWork {
            plan_id: "p-1".into(),
            path: "a.py".into(),
            attempt: 1,
            class: TaskClass::New,
        }),
        Message::TaskBuilt(TaskBuilt {
            plan_id: "p-1".into(),
            path: "a.py".into(),
            attempt: 1,
            artifact: "ab12".into(),
            cache_hit: false,
            executor: "builtin".into(),
            duration_ms: 42,
            reannounced: true,
        }),
        Message::TaskFailed(TaskFailed {
            plan_id: "p-1".into(),
            path: "a.py".into(),
            attempt: 2,
            stage: Stage::Dev,
            error: "executor exited 1".into(),
            retryable: true,
        }),
        Message::QaWork(QaWork {
            plan_id: "p-1".into(),
            path: "a.py".into(),
            attempt: 1,
            artifact: "ab12".into(),
        }),
        Message::QaResult(QaResult {
            plan_id: "p-1".into(),
            path: "a.py".into(),
            attempt: 1,
            artifact: "ab12".into(),
            passed: false,
            diagnostics: "E501 line too long".into(),
            checks: vec![CheckResult {
                name: "ruff".into(),
                status: "failed".into(),
                output: "a.py:1: E501".into(),
                duration_ms: 7,
            }],
        }),
        Message::TaskDone(TaskDone {
            plan_id: "p-1".into(),
            path: "a.py".into(),
            attempt: 1,
            artifact: "ab12".into(),
        }),
        Message::TaskFinallyFailed(TaskFinallyFailed {
            plan_id: "p-1".into(),
            path: "a.py".into(),
            attempt: 3,
            reason: "gave up after 3 failures; the last (dev attempt 3): boom".into(),
            dlq_id: Some("task-p-1-a.py-3".into()),
        }),
        Message::Escalation(Escalation {
            plan_id: "p-1".into(),
            path: Some("a.py".into()),
            reason: "gave up after 3 failures".into(),
            history: vec![AttemptRecord {
                attempt: 3,
                stage: Stage::Qa,
                error: "ruff failed".into(),
                at_ms: 1_700_000_000_123,
            }],
        }),
        Message::BreakerChanged(BreakerChanged {
            stage: Stage::Qa,
            state: "open".into(),
            reason: "error rate 0.75 over 8 outcomes".into(),
            error_rate: 0.75,
            volume: 8,
        }),
        Message::IntegrationWork(IntegrationWork {
            plan_id: "p-1".into(),
            step: step(),
            shard_index: 1,
            shard_count: 2,
        }),
        Message::IntegrationResult(IntegrationResult {
            plan_id: "p-1".into(),
            step: "pytest".into(),
            shard_index: 1,
            shard_count: 2,
            passed: true,
            output: "2 passed".into(),
            duration_ms: 1500,
        }),
        Message::DeployRequested(DeployRequested {
            deployment_id: "d-1".into(),
            plan_id: Some("p-1".into()),
            spec: deploy_spec(),
        }),
        Message::DeployFinished(DeployFinished {
            plan_id: "p-1".into(),
            deployment_id: "d-1".into(),
            promoted: false,
            message: "deployment 'd-1' rolled back: error rate 0.12 above 0.10".into(),
        }),
        Message::Metric(
            Metric::from_body(
                "dev-worker@host-1",
                &BuildTiming {
                    plan_id: "p-1".into(),
                    path: "a.py".into(),
                    duration_ms: 42,
                    cache_hit: true,
                    executor: "builtin".into(),
                    instance: "dev-worker@host-1".into(),
                },
            )
            .unwrap(),
        ),
    ]
}

/// The fixed envelope a golden file holds: every header field set (the
/// traceparent only on messages about a task, so both shapes are covered).
fn envelope(message: Message) -> Envelope {
    let mut env = Envelope::new(message);
    env.id = "00000000-0000-4000-8000-000000000001".into();
    env.timestamp_ms = 1_700_000_000_000;
    if env.task_id.is_some() {
        env.traceparent = Some(TRACEPARENT.into());
    }
    env
}

#[test]
fn every_message_kind_has_golden_bytes_that_decode_back() {
    let messages = messages();
    let kinds: Vec<&str> = messages.iter().map(Message::kind).collect();
    assert_eq!(
        kinds,
        Message::KINDS,
        "one fixture per kind, in KINDS order"
    );
    for message in messages {
        let env = envelope(message);
        let kind = env.kind();
        let bytes = env.encode().unwrap();
        check_file(&format!("envelope/{kind}.hex"), &to_hex(&bytes));
        let golden = from_hex(
            &std::fs::read_to_string(golden_dir().join(format!("envelope/{kind}.hex"))).unwrap(),
        );
        assert_eq!(Envelope::decode(&golden).unwrap(), env, "{kind}");
    }
}

#[test]
fn the_envelope_header_layout_is_fixed() {
    // The framing on its own: a message about nothing (no ids, attempt 0,
    // no trace), and the set of header keys.
    let env = envelope(Message::BreakerChanged(BreakerChanged {
        stage: Stage::Dev,
        state: "closed".into(),
        reason: String::new(),
        error_rate: 0.0,
        volume: 0,
    }));
    let bytes = env.encode().unwrap();
    check_file("envelope/framing-minimal.hex", &to_hex(&bytes));
    let keys: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
        rmp_serde::from_slice(&bytes).unwrap();
    let keys: Vec<&str> = keys.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "attempt",
            "body",
            "id",
            "kind",
            "plan_id",
            "task_id",
            "traceparent",
            "ts",
            "v"
        ]
    );
    #[derive(serde::Deserialize)]
    struct Header {
        v: u16,
        kind: String,
        plan_id: Option<String>,
        traceparent: Option<String>,
    }
    let header: Header = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(header.v, SCHEMA_VERSION);
    assert_eq!(header.kind, "breaker.changed");
    assert_eq!((header.plan_id, header.traceparent), (None, None));
}

/// A body's name, its sample, and a check that a metric reads back as it.
type BodyFixture = (&'static str, Metric, Box<dyn Fn(&Metric) -> bool>);

fn bodies() -> Vec<BodyFixture> {
    fn entry<B: MetricBody + PartialEq + 'static>(name: &'static str, body: B) -> BodyFixture {
        let metric = Metric::from_body("svc@host", &body).unwrap();
        let check = move |m: &Metric| m.body::<B>().is_ok_and(|b| b == body);
        (name, metric, Box::new(check))
    }
    vec![
        entry(
            "PlanProgress",
            PlanProgress {
                plan_id: "p-1".into(),
                name: "golden".into(),
                status: PlanStatus::Running,
                done: 1,
                failed: 0,
                blocked: 0,
                total: 2,
            },
        ),
        entry(
            "TaskCompleted",
            TaskCompleted {
                plan_id: "p-1".into(),
                path: "a.py".into(),
                status: PlanStatus::Running,
                done: 1,
                total: 2,
                released: 1,
            },
        ),
        entry(
            "TaskFixing",
            TaskFixing {
                plan_id: "p-1".into(),
                path: "a.py".into(),
                attempt: 2,
                failures: 1,
            },
        ),
        entry(
            "TaskRetrying",
            TaskRetrying {
                plan_id: "p-1".into(),
                path: "a.py".into(),
                stage: Stage::Dev,
                attempt: 2,
                failures: 1,
                delay_ms: 500,
            },
        ),
        entry(
            "TaskFailure",
            TaskFailure {
                plan_id: "p-1".into(),
                path: "a.py".into(),
                error: "gave up".into(),
                blocked: vec!["b.py".into()],
            },
        ),
        entry(
            "TaskDeadLettered",
            TaskDeadLettered {
                plan_id: "p-1".into(),
                path: "a.py".into(),
                error: "gave up".into(),
                dlq_id: "task:p-1:a.py:3".into(),
                blocked: vec!["b.py".into()],
            },
        ),
        entry(
            "IntegrationFailure",
            IntegrationFailure {
                plan_id: "p-1".into(),
                failed_steps: vec!["pytest#1".into()],
            },
        ),
        entry(
            "AnalyzeFailure",
            AnalyzeFailure {
                plan_id: "p-1".into(),
                error: "cycle".into(),
            },
        ),
        entry(
            "BuildFailure",
            BuildFailure {
                plan_id: "p-1".into(),
                path: "a.py".into(),
                error: "exit 1".into(),
                retryable: true,
                instance: "dev-worker@host".into(),
            },
        ),
        entry(
            "DispatchHealth",
            DispatchHealth {
                stage: Stage::Dev,
                breaker: "open".into(),
                dispatch: "paused".into(),
                healthy: false,
                generation: 3,
                reason: "error rate".into(),
                probes: 2,
                until_ms: Some(1_700_000_030_000),
            },
        ),
        entry(
            "BreakerHealth",
            BreakerHealth {
                stage: Stage::Qa,
                state: "half_open".into(),
                open: true,
                reason: "cooldown over".into(),
                error_rate: 0.5,
                volume: 10,
                since_ms: 1_700_000_000_000,
                until_ms: None,
            },
        ),
        entry(
            "SandboxHealth",
            SandboxHealth {
                isolation: "none".into(),
                healthy: false,
                warning: Some("no isolation".into()),
                slots: 4,
            },
        ),
        entry(
            "AnalyzeTiming",
            AnalyzeTiming {
                plan_id: "p-1".into(),
                tasks: 2,
                duration_ms: 12,
            },
        ),
        entry(
            "BuildTiming",
            BuildTiming {
                plan_id: "p-1".into(),
                path: "a.py".into(),
                duration_ms: 42,
                cache_hit: false,
                executor: "builtin".into(),
                instance: "dev-worker@host".into(),
            },
        ),
        entry(
            "QaCheckTiming",
            QaCheckTiming {
                check: "ruff".into(),
                status: "passed".into(),
                duration_ms: 7,
                sandbox: "bwrap".into(),
            },
        ),
        entry(
            "IntegrationTiming",
            IntegrationTiming {
                step: "pytest".into(),
                shard: 1,
                passed: true,
                duration_ms: 1500,
                sandbox: "bwrap".into(),
            },
        ),
        entry(
            "QueueStatus",
            QueueStatus {
                ready_len: 3,
                work_dev_depth: 1,
                dispatched_unreported: 2,
                workers: 2,
                slots: 8,
                busy: 5,
                waiting: 1,
                free_slots: 3,
                dev_breaker: "closed".into(),
            },
        ),
        entry(
            "WorkerStatus",
            WorkerStatus {
                instance: "dev-worker@host".into(),
                slots: 4,
                busy: 2,
                waiting: 1,
                backlog: 6,
            },
        ),
        entry(
            "DeploymentProgress",
            DeploymentProgress {
                deployment_id: "d-1".into(),
                plan_id: Some("p-1".into()),
                event: "check".into(),
                status: "running".into(),
                stage: 1,
                stages: 3,
                weight: 50,
                target_weight: 50,
                stage_elapsed_s: 12.5,
                classification: Some("healthy".into()),
                error_rate: Some(0.0125),
                error_rate_pct: Some("1.25%".into()),
                latency_p95_ms: Some(80.0),
                requests: Some(400),
                checks: 4,
                reason: None,
                instance: "canary@host".into(),
            },
        ),
        entry(
            "DeploymentRefused",
            DeploymentRefused::new("d-2".into(), None, "bad spec".into()),
        ),
    ]
}

#[test]
fn every_metric_body_has_golden_json_that_reads_back() {
    let bodies = bodies();
    let names: Vec<&str> = bodies.iter().map(|(n, _, _)| *n).collect();
    let defined: Vec<&str> = ALL_BODIES.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, defined, "one fixture per body, in ALL_BODIES order");
    for ((name, metric, reads_back), (_, metric_type)) in bodies.iter().zip(ALL_BODIES) {
        assert_eq!(metric.metric_type, *metric_type, "{name}");
        let text = serde_json::to_string_pretty(&metric.data).unwrap() + "\n";
        check_file(&format!("metrics/{name}.json"), &text);
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(golden_dir().join(format!("metrics/{name}.json"))).unwrap(),
        )
        .unwrap();
        let from_golden = Metric {
            data: golden,
            ..metric.clone()
        };
        assert!(reads_back(&from_golden), "{name} does not read back");
    }
}

// ----------------------------------------------------------- rolling upgrade

/// The envelope as a writer of another version would lay it out.
#[derive(Serialize)]
struct ForeignWire {
    v: u16,
    id: String,
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    /// A header field a newer version added.
    #[serde(skip_serializing_if = "Option::is_none")]
    priority_hint: Option<u8>,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

/// The body of a message as a JSON value (what a writer's struct held).
fn body_value(message: &Message) -> Value {
    let v = match message {
        Message::PlanSubmitted(m) => serde_json::to_value(m),
        Message::PlanAnalyzed(m) => serde_json::to_value(m),
        Message::PlanRejected(m) => serde_json::to_value(m),
        Message::PlanEvent(m) => serde_json::to_value(m),
        Message::TaskWork(m) => serde_json::to_value(m),
        Message::TaskBuilt(m) => serde_json::to_value(m),
        Message::TaskFailed(m) => serde_json::to_value(m),
        Message::QaWork(m) => serde_json::to_value(m),
        Message::QaResult(m) => serde_json::to_value(m),
        Message::TaskDone(m) => serde_json::to_value(m),
        Message::TaskFinallyFailed(m) => serde_json::to_value(m),
        Message::Escalation(m) => serde_json::to_value(m),
        Message::BreakerChanged(m) => serde_json::to_value(m),
        Message::IntegrationWork(m) => serde_json::to_value(m),
        Message::IntegrationResult(m) => serde_json::to_value(m),
        Message::DeployRequested(m) => serde_json::to_value(m),
        Message::DeployFinished(m) => serde_json::to_value(m),
        Message::Metric(m) => serde_json::to_value(m),
    };
    v.unwrap()
}

fn foreign_bytes(kind: &str, body: &Value, header_extra: bool, old_header: bool) -> Vec<u8> {
    let wire = ForeignWire {
        v: SCHEMA_VERSION,
        id: "00000000-0000-4000-8000-000000000002".into(),
        kind: kind.into(),
        plan_id: (!old_header).then(|| "p-1".into()),
        task_id: None,
        attempt: (!old_header).then_some(1),
        ts: 1_700_000_000_000,
        traceparent: None,
        priority_hint: header_extra.then_some(7),
        body: rmp_serde::to_vec_named(body).unwrap(),
    };
    rmp_serde::to_vec_named(&wire).unwrap()
}

/// Adds a field this version does not know to every struct in a body: the
/// top level and each nested struct (plans, tasks, steps, specs, checks,
/// histories), as a newer writer following the rule would.
fn add_unknown_fields(kind: &str, body: &mut Value) {
    fn add(v: &mut Value) {
        if let Value::Object(map) = v {
            map.insert("added_later".into(), json!({ "x": [1, 2.5, "three"] }));
        }
    }
    fn add_all(v: &mut Value) {
        if let Value::Array(items) = v {
            items.iter_mut().for_each(add);
        }
    }
    add(body);
    if let Some(plan) = body.get_mut("plan") {
        add(plan);
        add_all(plan.get_mut("tasks").unwrap());
        add_all(plan.get_mut("integration").unwrap());
        let deploy = plan.get_mut("deploy").unwrap();
        add(deploy);
        add(deploy.get_mut("thresholds").unwrap());
    }
    match kind {
        "plan.analyzed" => add_all(body.get_mut("tasks").unwrap()),
        "qa.result" => add_all(body.get_mut("checks").unwrap()),
        "escalation" => add_all(body.get_mut("history").unwrap()),
        "integration.work" => add(body.get_mut("step").unwrap()),
        "deploy.requested" => {
            let spec = body.get_mut("spec").unwrap();
            add(spec);
            add(spec.get_mut("thresholds").unwrap());
        }
        _ => {}
    }
}

#[test]
fn a_newer_writer_with_extra_fields_still_decodes() {
    for message in messages() {
        let kind = message.kind();
        let mut body = body_value(&message);
        add_unknown_fields(kind, &mut body);
        let bytes = foreign_bytes(kind, &body, true, false);
        let env = Envelope::decode(&bytes)
            .unwrap_or_else(|e| panic!("{kind} with extra fields must decode: {e}"));
        assert_eq!(env.message, message, "{kind}: the extra fields are ignored");
    }
}

#[test]
fn an_older_writer_without_defaulted_fields_still_decodes() {
    // Every field that is optional or defaulted today, removed as a writer
    // from before it existed would send the message.
    let removed: &[(&str, &[&str])] = &[
        ("plan.event", &["message"]),
        ("escalation", &["path"]),
        ("deploy.requested", &["plan_id"]),
        ("task.finally_failed", &["dlq_id"]),
        ("task.built", &["reannounced"]),
    ];
    for message in messages() {
        let kind = message.kind();
        let mut body = body_value(&message);
        let fields = removed
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(&[][..], |(_, f)| f);
        for field in fields {
            body.as_object_mut().unwrap().remove(*field);
        }
        if let Some(plan) = body.get_mut("plan") {
            let plan = plan.as_object_mut().unwrap();
            for field in ["base", "executor", "integration", "deploy"] {
                plan.remove(field);
            }
        }
        if kind == "plan.analyzed" {
            for task in body["tasks"].as_array_mut().unwrap() {
                let task = task.as_object_mut().unwrap();
                task.remove("content");
                task.remove("executor");
            }
        }
        let bytes = foreign_bytes(kind, &body, false, true);
        let env = Envelope::decode(&bytes)
            .unwrap_or_else(|e| panic!("{kind} without defaulted fields must decode: {e}"));
        assert_eq!(env.kind(), kind);
        assert_eq!((env.plan_id.as_deref(), env.attempt), (None, 0));
        match env.message {
            Message::PlanEvent(m) => assert_eq!(m.message, None),
            Message::Escalation(m) => assert_eq!(m.path, None),
            Message::DeployRequested(m) => assert_eq!(m.plan_id, None),
            Message::TaskFinallyFailed(m) => assert_eq!(m.dlq_id, None),
            Message::TaskBuilt(m) => assert!(!m.reannounced),
            Message::PlanSubmitted(m) => {
                assert_eq!((m.plan.base, m.plan.deploy), (None, None));
                assert!(m.plan.integration.is_empty());
            }
            Message::PlanAnalyzed(m) => {
                assert_eq!((&m.tasks[0].content, m.tasks[0].executor), (&None, None));
            }
            _ => {}
        }
    }
}

#[test]
fn metric_bodies_survive_a_rolling_upgrade_both_ways() {
    for (name, metric, reads_back) in bodies() {
        // Newer writer: an extra field is ignored.
        let mut newer = metric.clone();
        newer.data["added_later"] = json!({ "x": 1 });
        assert!(reads_back(&newer), "{name} with an extra field");
    }
    // Older writer: a worker sample from before `backlog` and `instance`
    // reads with defaults (the gateway then uses the sample's source).
    let older = Metric {
        metric_type: MetricType::WorkerStatus,
        source: "dev-worker@old".into(),
        data: json!({ "slots": 4, "busy": 1, "waiting": 0 }),
    };
    let w: WorkerStatus = older.body().unwrap();
    assert_eq!((w.instance.as_str(), w.slots, w.backlog), ("", 4, 0));
    // And a body no struct matches is an error to skip, never a panic.
    let odd = Metric {
        metric_type: MetricType::Deployment,
        source: "x".into(),
        data: json!([1, 2]),
    };
    assert!(DeploymentSample::from_metric(&odd).is_err());
}
