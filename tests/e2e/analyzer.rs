//! The analyzer service over RabbitMQ and Redis.

use crate::support::real_connections;
use devfleet_bus::ConsumeOptions;
use devfleet_protocol::{queues, Message, Plan, PlanAnalyzed, PlanStatus, PlanSubmitted, TaskDef};
use devfleet_runtime::BusKind;
use devfleet_testkit::{unique, wait_for, within};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn task(path: &str, content: &str, depends_on: &[&str]) -> TaskDef {
    TaskDef {
        requires: Vec::new(),
        path: path.into(),
        spec: format!("spec of {path}"),
        content: Some(content.into()),
        depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
        estimate: None,
        executor: None,
        writes: Vec::new(),
    }
}

fn plan(tasks: Vec<TaskDef>) -> Plan {
    Plan {
        requires: Vec::new(),
        name: "e2e".into(),
        base: None,
        base_snapshot: None,
        executor: None,
        tasks,
        integration: vec![],
        deploy: None,
        budget: None,
    }
}

#[tokio::test]
async fn analyzer_turns_a_submitted_plan_into_a_dag_over_rabbitmq() {
    let connections = real_connections(BusKind::Amqp).await;
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(devfleet_analyzer::service::run(
        devfleet_analyzer::service::Config::new(connections.clone()),
        shutdown.clone(),
    ));
    let mut analyzed = connections
        .consume(queues::PLANS_ANALYZED, ConsumeOptions::default())
        .await
        .unwrap();

    let plan_id = unique("plan");
    let submitted = PlanSubmitted {
        plan_id: plan_id.clone(),
        plan: plan(vec![
            task("app/__init__.py", "", &[]),
            task("app/db.py", "import sqlite3\n", &[]),
            task("app/models.py", "from app.db import connect\n", &[]),
            task(
                "app/api.py",
                "from app import models\nfrom . import db\n",
                &[],
            ),
            task("README.md", "docs", &["app/api.py"]),
        ]),
    };
    connections
        .publish(queues::PLANS_SUBMITTED, submitted)
        .await
        .unwrap();

    let (envelope, delivery) = within(
        "plans.analyzed",
        Duration::from_secs(30),
        analyzed.next_envelope(),
    )
    .await
    .expect("consumer open")
    .expect("delivery");
    delivery.ack().await.unwrap();
    let Message::PlanAnalyzed(result) = envelope.message else {
        panic!("expected plan.analyzed, got {}", envelope.message.kind());
    };
    assert_eq!(result.plan_id, plan_id);
    let get = |p: &str| result.tasks.iter().find(|t| t.path == p).unwrap().clone();
    assert_eq!(get("app/models.py").depends_on, vec!["app/db.py"]);
    let mut api = get("app/api.py").depends_on;
    api.sort();
    // `from app import models` names the submodule, not the package
    // (DESIGN.md: Python's own resolution, as grimp draws it).
    assert_eq!(api, vec!["app/db.py", "app/models.py"]);
    assert_eq!(get("README.md").depends_on, vec!["app/api.py"]);
    // db is on the critical path db -> models -> api -> README, so it runs first.
    assert!(get("app/db.py").priority > get("app/models.py").priority);
    assert!(get("app/models.py").priority > get("app/api.py").priority);
    assert_eq!(
        result.critical_path.first().map(String::as_str),
        Some("app/db.py")
    );
    assert_eq!(
        result.critical_path.last().map(String::as_str),
        Some("README.md")
    );

    shutdown.cancel();
    within("analyzer shutdown", Duration::from_secs(10), service)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn analyzer_records_a_rejected_plan_with_the_reason() {
    // Bypasses `Plan::parse`, as a buggy or hostile publisher would.
    let message = rejection_of(plan(vec![task("a.py", "", &["missing.py"])])).await;
    assert!(
        message.contains("a.py") && message.contains("missing.py"),
        "{message}"
    );
}

/// Runs an analyzer over RabbitMQ, submits `plan`, waits until the plan is
/// recorded Rejected and returns the reason recorded.
async fn rejection_of(plan: Plan) -> String {
    let connections = real_connections(BusKind::Amqp).await;
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(devfleet_analyzer::service::run(
        devfleet_analyzer::service::Config::new(connections.clone()),
        shutdown.clone(),
    ));
    let plan_id = unique("rejected");
    connections
        .publish(
            queues::PLANS_SUBMITTED,
            PlanSubmitted {
                plan_id: plan_id.clone(),
                plan,
            },
        )
        .await
        .unwrap();
    let store = connections.store.clone();
    let record = wait_for(
        "the rejection in the store",
        Duration::from_secs(60),
        || {
            let store = store.clone();
            let plan_id = plan_id.clone();
            async move { store.plan(&plan_id).await.unwrap() }
        },
    )
    .await;
    assert_eq!(record.status, PlanStatus::Rejected);
    shutdown.cancel();
    within("analyzer shutdown", Duration::from_secs(10), service)
        .await
        .unwrap()
        .unwrap();
    record.message.unwrap_or_default()
}

/// Runs an analyzer on `connections`, submits `plan` and returns what it
/// published on `plans.analyzed`.
async fn analyze_over(connections: &devfleet_runtime::Connections, plan: Plan) -> PlanAnalyzed {
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(devfleet_analyzer::service::run(
        devfleet_analyzer::service::Config::new(connections.clone()),
        shutdown.clone(),
    ));
    let mut analyzed = connections
        .consume(queues::PLANS_ANALYZED, ConsumeOptions::default())
        .await
        .unwrap();
    let plan_id = unique("big");
    connections
        .publish(
            queues::PLANS_SUBMITTED,
            PlanSubmitted {
                plan_id: plan_id.clone(),
                plan,
            },
        )
        .await
        .expect("a plan within the limits fits plans.submitted");
    let (envelope, delivery) = within(
        "plans.analyzed",
        Duration::from_secs(180),
        analyzed.next_envelope(),
    )
    .await
    .expect("consumer open")
    .expect("delivery");
    delivery.ack().await.unwrap();
    shutdown.cancel();
    within("analyzer shutdown", Duration::from_secs(30), service)
        .await
        .unwrap()
        .unwrap();
    let Message::PlanAnalyzed(result) = envelope.message else {
        panic!("expected plan.analyzed, got {}", envelope.message.kind());
    };
    assert_eq!(result.plan_id, plan_id);
    result
}

/// The largest plan the limits admit in tasks, and close to the limit in
/// bytes: `MAX_TASKS` modules, each importing the one before it.
fn largest_plan() -> Plan {
    use devfleet_protocol::plan::{MAX_PLAN_BYTES, MAX_TASKS};
    let per_task = MAX_PLAN_BYTES / MAX_TASKS;
    let tasks: Vec<TaskDef> = (0..MAX_TASKS)
        .map(|i| {
            let path = format!("pkg/m{i:05}.py");
            let spec = format!("module {i}: {}", "s".repeat(60));
            let mut content = if i == 0 {
                String::new()
            } else {
                format!("import pkg.m{:05}\n", i - 1)
            };
            let room = per_task.saturating_sub(path.len() + spec.len() + content.len() + 8);
            content.push_str(&format!("# {}\n", "x".repeat(room.saturating_sub(3))));
            TaskDef {
                requires: Vec::new(),
                path,
                spec,
                content: Some(content),
                depends_on: vec![],
                estimate: None,
                executor: None,
                writes: Vec::new(),
            }
        })
        .collect();
    let plan = plan(tasks);
    plan.validate().expect("within the limits");
    assert!(
        plan.text_bytes() > MAX_PLAN_BYTES * 9 / 10,
        "{}",
        plan.text_bytes()
    );
    plan
}

async fn largest_plan_passes_the_analyzer(connections: devfleet_runtime::Connections) {
    let result = analyze_over(&connections, largest_plan()).await;
    assert_eq!(result.tasks.len(), devfleet_protocol::plan::MAX_TASKS);
    let last = result
        .tasks
        .iter()
        .find(|t| t.path == "pkg/m19999.py")
        .expect("the last module");
    assert_eq!(last.depends_on, ["pkg/m19998.py"]);
    assert_eq!(
        result.critical_path.len(),
        devfleet_protocol::plan::MAX_TASKS
    );
}

#[tokio::test]
async fn a_plan_of_20000_tasks_fits_the_analyzer_messages_over_rabbitmq() {
    largest_plan_passes_the_analyzer(real_connections(BusKind::Amqp).await).await;
}

#[tokio::test]
async fn a_plan_of_20000_tasks_fits_the_analyzer_messages_over_nats() {
    largest_plan_passes_the_analyzer(real_connections(BusKind::Nats).await).await;
}

#[tokio::test]
async fn a_plan_of_20000_tasks_fits_the_analyzer_messages_in_memory() {
    largest_plan_passes_the_analyzer(devfleet_runtime::Connections::in_memory()).await;
}

#[tokio::test]
async fn an_analysis_too_large_for_the_bus_rejects_the_plan_instead_of_retrying() {
    // Small as a plan, huge as an analysis: 200 modules in a deep
    // directory, each requiring every one before it, so each parsed
    // dependency repeats a ~900-byte path (about 20,000 of them).
    let dir = "d".repeat(900);
    let tasks: Vec<TaskDef> = (0..200)
        .map(|i| {
            let content: String = (0..i).map(|j| format!("require('./m{j}');\n")).collect();
            task(&format!("{dir}/m{i}.js"), &content, &[])
        })
        .collect();
    let plan = plan(tasks);
    plan.validate().expect("within the plan limits");
    let message = rejection_of(plan).await;
    assert!(
        message.contains("the bus carries at most")
            && message.contains(&devfleet_protocol::MAX_ENVELOPE_BYTES.to_string()),
        "{message}"
    );
}
