//! Agent CLIs through the `command` executor in the real pipeline: a plan's
//! tasks written by `examples/agents/fake-agent.py` (a program that behaves
//! like an agent: reads the prompt, edits files, fails when told to), run
//! sandboxed by a dev-worker, then checked by the router and qa-worker over
//! real RabbitMQ and Redis.

use crate::pipeline::{analyzed, t, Backend, Stack};
use crate::support::repo;
use devfleet_dev_worker::executor::command::profile::AgentProfile;
use devfleet_dev_worker::executor::command::sandbox::AgentSandbox;
use devfleet_dev_worker::executor::command::CommandExecutor;
use devfleet_dev_worker::Executors;
use devfleet_protocol::{ExecutorKind, PlanStatus};
use std::sync::Arc;
use std::time::Duration;

/// The command executor running fake-agent.py in the real sandbox.
fn fake_agent_executors() -> Executors {
    let dir = repo().join("examples/agents").display().to_string();
    let profile = AgentProfile::parse(&format!(
        "name: fake\ncommand: [/usr/bin/python3, '{dir}/fake-agent.py']\nstdin: prompt\n\
         ro_binds: ['{dir}']\n"
    ))
    .expect("the profile parses");
    let sandbox = AgentSandbox::detect(None, vec![]).expect("bwrap (scripts/test.sh installs it)");
    let command = CommandExecutor::new(profile, 1 << 20).sandboxed(Some(sandbox));
    Executors::new(ExecutorKind::Builtin).with(ExecutorKind::Command, Arc::new(command))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_written_by_a_sandboxed_agent_cli_passes_qa_after_a_retry() {
    let mut stack = Stack::new(Backend::Real).await;
    stack.routed_pipeline();
    stack.worker(fake_agent_executors(), 2, 2);
    let mut first = t("app/models.py", &[] as &[&str]);
    first.spec = "the models".into();
    let mut second = t("app/views.py", &["app/models.py"]);
    // The agent fails its first attempt on purpose: the router retries it.
    second.spec = "the views\nagent: fail-attempts 1".into();
    let plan = analyzed(vec![first, second], ExecutorKind::Command);
    stack.submit(&plan).await;
    let record = stack
        .finished(&plan.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");

    let store = &stack.connections.store;
    let plan_id = plan.plan_id.as_str();
    let text = |path: &'static str| async move {
        let task = store.task(plan_id, path).await.unwrap().unwrap();
        let bytes = store
            .artifact(task.artifact.as_deref().unwrap())
            .await
            .unwrap();
        (task.attempt, String::from_utf8(bytes.unwrap()).unwrap())
    };
    let (_, models) = text("app/models.py").await;
    assert!(
        models.contains("# prompt: # Task: write `app/models.py`"),
        "{models}"
    );
    let (attempt, views) = text("app/views.py").await;
    assert!(attempt >= 2, "the failed attempt was retried");
    assert!(
        views.contains("# written by fake-agent, attempt 2"),
        "{views}"
    );
    stack.stop().await;
}
