//! The analyzer service over RabbitMQ and Redis.

use crate::support::real_connections;
use devfleet_bus::ConsumeOptions;
use devfleet_protocol::{queues, Message, Plan, PlanStatus, PlanSubmitted, TaskDef};
use devfleet_runtime::BusKind;
use devfleet_testkit::{unique, wait_for, within};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn task(path: &str, content: &str, depends_on: &[&str]) -> TaskDef {
    TaskDef {
        path: path.into(),
        spec: format!("spec of {path}"),
        content: Some(content.into()),
        depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
        estimate: None,
        executor: None,
    }
}

fn plan(tasks: Vec<TaskDef>) -> Plan {
    Plan {
        name: "e2e".into(),
        base: None,
        executor: None,
        tasks,
        integration: vec![],
        deploy: None,
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
    let connections = real_connections(BusKind::Amqp).await;
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(devfleet_analyzer::service::run(
        devfleet_analyzer::service::Config::new(connections.clone()),
        shutdown.clone(),
    ));
    // Bypasses `Plan::parse`, as a buggy or hostile publisher would.
    let plan_id = unique("bad");
    let bad = PlanSubmitted {
        plan_id: plan_id.clone(),
        plan: plan(vec![task("a.py", "", &["missing.py"])]),
    };
    connections
        .publish(queues::PLANS_SUBMITTED, bad)
        .await
        .unwrap();
    let store = connections.store.clone();
    let record = wait_for(
        "the rejection in the store",
        Duration::from_secs(30),
        || {
            let store = store.clone();
            let plan_id = plan_id.clone();
            async move { store.plan(&plan_id).await.unwrap() }
        },
    )
    .await;
    assert_eq!(record.status, PlanStatus::Rejected);
    let message = record.message.unwrap_or_default();
    assert!(
        message.contains("a.py") && message.contains("missing.py"),
        "{message}"
    );
    shutdown.cancel();
    within("analyzer shutdown", Duration::from_secs(10), service)
        .await
        .unwrap()
        .unwrap();
}
