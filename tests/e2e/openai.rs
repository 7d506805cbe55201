//! The `openai` executor through the real scheduler and dev-worker, over
//! real RabbitMQ and Redis, against the test kit's scripted
//! OpenAI-compatible server: what reaches the model's prompt, and
//! fleet-wide rate limits across dev-worker processes.

use devfleet_dev_worker::executor::openai::{OpenAi, OpenAiSettings, Price};
use devfleet_dev_worker::{Executors, ScalePolicy};
use devfleet_protocol::{AnalyzedTask, ExecutorKind, Plan, PlanAnalyzed, PlanStatus};
use devfleet_runtime::Connections;
use devfleet_testkit::openai::{Reply, Rule, ScriptedOpenAi};
use devfleet_testkit::{amqp_url, redis_url, unique, within};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn task(path: &str, deps: &[&str], priority: u32, batch: u32) -> AnalyzedTask {
    AnalyzedTask {
        path: path.into(),
        spec: format!("spec of {path}"),
        content: None,
        depends_on: deps.iter().map(|d| (*d).to_owned()).collect(),
        estimate: 1,
        priority,
        batch,
        executor: None,
        base_imports: Vec::new(),
    }
}

/// app/c.py depends on app/b.py, which depends on app/a.py: the model
/// writing c.py sees a.py's generated code too (a transitive dependency,
/// marked with its distance).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prompt_of_a_task_holds_its_transitive_dependencies_generated_code() {
    devfleet_telemetry::init_for_tests();
    let server = ScriptedOpenAi::start(vec![
        Rule::when_prompt_contains("Write the file `app/a.py`")
            .reply(Reply::file("app/a.py", "GENERATED_A = 'from the model'\n").usage(10, 5)),
        Rule::when_prompt_contains("Write the file `app/b.py`").reply(Reply::file(
            "app/b.py",
            "from app.a import GENERATED_A\nGENERATED_B = 2\n",
        )),
        Rule::when_prompt_contains("Write the file `app/c.py`")
            .reply(Reply::file("app/c.py", "C = 3\n")),
    ])
    .await;
    let namespace = unique("t");
    let bus = devfleet_bus::connect(&amqp_url()).await.expect("RabbitMQ");
    let store = devfleet_store::connect_with_prefix(&redis_url(), &format!("devfleet:{namespace}"))
        .await
        .expect("Redis");
    let connections = Connections {
        broadcast: bus.clone(),
        bus,
        store,
        namespace,
    };
    let shutdown = CancellationToken::new();
    let mut services = tokio::task::JoinSet::new();
    let mut scheduler = devfleet_scheduler::Config::new(connections.clone());
    scheduler.direct_routing = true;
    scheduler.dispatch_tick = Duration::from_millis(10);
    services.spawn(devfleet_scheduler::run(scheduler, shutdown.clone()));
    let openai = OpenAi::new(OpenAiSettings {
        base_url: server.base_url(),
        model: "scripted".into(),
        max_tokens: Some(256),
        ..OpenAiSettings::default()
    })
    .unwrap()
    .with_provider("test", Price::default());
    let mut worker = devfleet_dev_worker::Config::new(connections.clone());
    worker.executors =
        Executors::new(ExecutorKind::Openai).with(ExecutorKind::Openai, Arc::new(openai));
    worker.scale = ScalePolicy {
        min: 1,
        max: 1,
        ..ScalePolicy::default()
    };
    services.spawn(devfleet_dev_worker::run(worker, shutdown.clone()));

    let plan = PlanAnalyzed {
        plan_id: unique("plan"),
        plan: Plan {
            name: "openai".into(),
            base: None,
            executor: Some(ExecutorKind::Openai),
            tasks: vec![],
            integration: vec![],
            deploy: None,
            budget: None,
            base_snapshot: None,
            requires: Vec::new(),
        },
        tasks: vec![
            task("app/a.py", &[], 3, 0),
            task("app/b.py", &["app/a.py"], 2, 1),
            task("app/c.py", &["app/b.py"], 1, 2),
        ],
        critical_path_length: 3,
        critical_path: vec![],
    };
    crate::support::submit(&connections, &plan).await;
    let record = crate::support::plan_where(
        &connections,
        &plan.plan_id,
        "end",
        Duration::from_secs(60),
        |p| p.status.is_final(),
    )
    .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");

    let requests = server.requests();
    let c = requests
        .iter()
        .map(|r| r.prompt())
        .find(|p| p.contains("Write the file `app/c.py`"))
        .expect("a request for app/c.py");
    assert!(c.contains("GENERATED_B = 2"), "{c}");
    assert!(c.contains("GENERATED_A = 'from the model'"), "{c}");
    assert!(
        c.contains("### app/a.py (indirect dependency (distance 2)"),
        "{c}"
    );
    assert!(c.contains("- included whole: app/b.py, app/a.py"), "{c}");

    shutdown.cancel();
    within("services to stop", Duration::from_secs(30), async {
        while let Some(joined) = services.join_next().await {
            joined.expect("service panicked").expect("service failed");
        }
    })
    .await;
}

/// Connections in a fresh namespace, and a scheduler (direct routing: no
/// router, built tasks complete directly).
async fn stack() -> (
    Connections,
    CancellationToken,
    tokio::task::JoinSet<anyhow::Result<()>>,
) {
    devfleet_telemetry::init_for_tests();
    let namespace = unique("t");
    let bus = devfleet_bus::connect(&amqp_url()).await.expect("RabbitMQ");
    let store = devfleet_store::connect_with_prefix(&redis_url(), &format!("devfleet:{namespace}"))
        .await
        .expect("Redis");
    let connections = Connections {
        broadcast: bus.clone(),
        bus,
        store,
        namespace,
    };
    let shutdown = CancellationToken::new();
    let mut services = tokio::task::JoinSet::new();
    let mut scheduler = devfleet_scheduler::Config::new(connections.clone());
    scheduler.direct_routing = true;
    scheduler.dispatch_tick = Duration::from_millis(10);
    scheduler.reap_interval = Duration::from_millis(100);
    services.spawn(devfleet_scheduler::run(scheduler, shutdown.clone()));
    (connections, shutdown, services)
}

/// Two `dev-worker` processes (three slots each) share a limit of 2
/// requests per 2-second window through Redis. A token bucket lets at most
/// `capacity + span × rate` requests start in any span; counting the
/// server's arrival times over a window W, with W of slack for the time
/// between taking a token and the request arriving, allows
/// `2 + (2 s + 2 s) × 1/s = 6`. Unlimited, the twelve requests arrive
/// within a fraction of a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_worker_processes_together_never_exceed_the_requests_per_minute_limit() {
    let server = ScriptedOpenAi::start(vec![]).await;
    let (connections, shutdown, mut services) = stack().await;
    let dir = std::env::temp_dir().join(unique("providers"));
    std::fs::create_dir_all(&dir).unwrap();
    let providers = dir.join("providers.yaml");
    std::fs::write(
        &providers,
        format!(
            "default: scripted/coder\nproviders:\n  - name: scripted\n    base_url: {}\n    \
             models:\n      - name: coder\n        limits: {{ requests_per_minute: 2 }}\n",
            server.base_url()
        ),
    )
    .unwrap();
    let spawn = |instance: &str| {
        tokio::process::Command::new(crate::support::service_binary("dev-worker"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("DEVFLEET_BUS", "amqp")
            .env("DEVFLEET_AMQP_URL", amqp_url())
            .env("DEVFLEET_REDIS_URL", redis_url())
            .env("DEVFLEET_NAMESPACE", &connections.namespace)
            .env("DEVFLEET_DEV_INSTANCE", instance)
            .env("DEVFLEET_EXECUTOR", "openai")
            .env("DEVFLEET_PROVIDERS", &providers)
            .env("DEVFLEET_RATE_WINDOW_SECONDS", "2")
            .env("DEVFLEET_DEV_MIN_SLOTS", "3")
            .env("DEVFLEET_DEV_MAX_SLOTS", "3")
            .env("DEVFLEET_DEV_CACHE", "false")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning the dev-worker binary")
    };
    let mut workers = [spawn("limited-a"), spawn("limited-b")];

    let n = 12;
    let plan = PlanAnalyzed {
        plan_id: unique("plan"),
        plan: Plan {
            name: "limited".into(),
            base: None,
            executor: Some(ExecutorKind::Openai),
            tasks: vec![],
            integration: vec![],
            deploy: None,
            budget: None,
            base_snapshot: None,
            requires: Vec::new(),
        },
        tasks: (0..n)
            .map(|i| task(&format!("f{i}.py"), &[], 1, 0))
            .collect(),
        critical_path_length: 1,
        critical_path: vec![],
    };
    crate::support::submit(&connections, &plan).await;
    let record = crate::support::plan_where(
        &connections,
        &plan.plan_id,
        "end",
        Duration::from_secs(120),
        |p| p.status.is_final(),
    )
    .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");

    let times: Vec<Duration> = server.requests().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), n, "one request per task");
    let window = Duration::from_secs(2);
    for start in &times {
        let in_window = times
            .iter()
            .filter(|t| **t >= *start && **t < *start + window)
            .count();
        assert!(
            in_window <= 6,
            "{in_window} requests arrived within {window:?} of {start:?}: {times:?}"
        );
    }

    for worker in &mut workers {
        let _ = worker.start_kill();
        let _ = worker.wait().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    shutdown.cancel();
    within("services to stop", Duration::from_secs(30), async {
        while let Some(joined) = services.join_next().await {
            joined.expect("service panicked").expect("service failed");
        }
    })
    .await;
}

/// A plan over an existing repository (a `base` directory, snapshotted as
/// `devfleet publish` does) runs with the `openai` executor through the
/// real analyzer, scheduler and dev-worker: the prompt of a task holds the
/// base file it imports and its dependency's generated code, and the usage
/// the store recorded for the plan equals what the server answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plan_over_an_existing_repository_runs_with_the_openai_executor() {
    let server = ScriptedOpenAi::start(vec![
        Rule::when_prompt_contains("Write the file `app/api.py`").reply(
            Reply::file(
                "app/api.py",
                "from lib.util import helper\n\ndef answer():\n    return helper()\n",
            )
            .usage(120, 30),
        ),
        Rule::when_prompt_contains("Write the file `app/cli.py`").reply(
            Reply::file(
                "app/cli.py",
                "from app.api import answer\nprint(answer())\n",
            )
            .usage(200, 15),
        ),
    ])
    .await;
    let (connections, shutdown, mut services) = stack().await;
    services.spawn(devfleet_analyzer::service::run(
        devfleet_analyzer::service::Config::new(connections.clone()),
        shutdown.clone(),
    ));
    let openai = OpenAi::new(OpenAiSettings {
        base_url: server.base_url(),
        model: "scripted".into(),
        max_tokens: Some(256),
        ..OpenAiSettings::default()
    })
    .unwrap()
    .with_provider(
        "test",
        Price {
            input_per_million: 1.0,
            output_per_million: 4.0,
        },
    );
    let work_dir = tempfile::tempdir().unwrap();
    let mut worker = devfleet_dev_worker::Config::new(connections.clone());
    worker.executors =
        Executors::new(ExecutorKind::Openai).with(ExecutorKind::Openai, Arc::new(openai));
    worker.work_dir = work_dir.path().to_path_buf();
    services.spawn(devfleet_dev_worker::run(worker, shutdown.clone()));

    // The existing code, snapshotted into the store as publish does.
    let base = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(base.path().join("lib")).unwrap();
    std::fs::write(base.path().join("lib/__init__.py"), "").unwrap();
    std::fs::write(
        base.path().join("lib/util.py"),
        "def helper():\n    return 'EXISTING_HELPER'\n",
    )
    .unwrap();
    let built =
        devfleet_store::snapshot::build(base.path(), devfleet_store::snapshot::Limits::default())
            .unwrap();
    let snapshot_id = built.store(connections.store.as_ref()).await.unwrap();
    let mut plan = Plan::parse(
        r#"
name: over-a-repository
base: ./repo
executor: openai
tasks:
  - path: app/api.py
    spec: an API over the existing helper
    content: "from lib.util import helper\n"
  - path: app/cli.py
    spec: a command line calling the API
    content: "from app.api import answer\n"
"#,
    )
    .unwrap();
    plan.base_snapshot = Some(snapshot_id);
    let plan_id = unique("repo");
    connections
        .publish(
            devfleet_protocol::queues::PLANS_SUBMITTED,
            devfleet_protocol::PlanSubmitted {
                plan_id: plan_id.clone(),
                plan,
            },
        )
        .await
        .unwrap();
    let record = crate::support::plan_where(
        &connections,
        &plan_id,
        "end",
        Duration::from_secs(60),
        |p| p.status.is_final(),
    )
    .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");

    let prompts: Vec<String> = server.requests().iter().map(|r| r.prompt()).collect();
    let prompt_of = |path: &str| {
        prompts
            .iter()
            .find(|p| p.contains(&format!("Write the file `{path}`")))
            .unwrap_or_else(|| panic!("no request for {path}: {prompts:?}"))
            .clone()
    };
    let api = prompt_of("app/api.py");
    assert!(
        api.contains("return 'EXISTING_HELPER'"),
        "the base file: {api}"
    );
    let cli = prompt_of("app/cli.py");
    assert!(
        cli.contains("def answer():\n    return helper()"),
        "the dependency's generated code: {cli}"
    );

    // Usage recorded for the plan equals what the server answered.
    let usage = connections.store.plan_usage(&plan_id).await.unwrap();
    let (tokens_in, tokens_out) = server.usage_totals();
    assert_eq!((tokens_in, tokens_out), (320, 45));
    assert_eq!(usage.total.tokens_in, tokens_in);
    assert_eq!(usage.total.tokens_out, tokens_out);
    assert_eq!(usage.total.calls, 2);
    assert_eq!(usage.total.estimated, 0);
    // 320 × $1 + 45 × $4 per million tokens.
    assert_eq!(usage.total.cost_nusd, 500_000);
    assert_eq!(usage.by_model["test/scripted"].calls, 2);

    shutdown.cancel();
    within("services to stop", Duration::from_secs(30), async {
        while let Some(joined) = services.join_next().await {
            joined.expect("service panicked").expect("service failed");
        }
    })
    .await;
}

/// The fix loop with a model: the first reply does not compile, the
/// qa-worker's check rejects it, the router turns the verdict into a fix,
/// and the fix's request to the model carries the check's diagnostics and
/// the rejected file; the corrected reply passes and the plan succeeds.
/// Usage counts both calls, as the server answered them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_qa_failure_becomes_a_fix_request_carrying_the_diagnostics() {
    let server = ScriptedOpenAi::start(vec![
        Rule::when_prompt_contains("failed its checks")
            .reply(Reply::file("app/calc.py", "def half(x):\n    return x / 2\n").usage(300, 20)),
        Rule::any()
            .reply(Reply::file("app/calc.py", "def half(x:\n    return x / 2\n").usage(100, 12)),
    ])
    .await;
    let (stack, plan) = one_task_through_qa(&server, "app/calc.py").await;

    let prompts: Vec<String> = server.requests().iter().map(|r| r.prompt()).collect();
    assert_eq!(prompts.len(), 2, "the first try and the fix: {prompts:#?}");
    assert!(!prompts[0].contains("failed its checks"), "{}", prompts[0]);
    let fix = &prompts[1];
    assert!(
        fix.contains("failed its checks. Diagnostics:") && fix.contains("SyntaxError"),
        "the check's diagnostics: {fix}"
    );
    assert!(
        fix.contains("The previous attempt:") && fix.contains("def half(x:\n"),
        "the rejected file: {fix}"
    );
    let task = stack
        .connections
        .store
        .task(&plan.plan_id, "app/calc.py")
        .await
        .unwrap()
        .unwrap();
    let text = stack
        .connections
        .store
        .artifact(&task.artifact.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text, b"def half(x):\n    return x / 2\n");
    assert_eq!(server.usage_totals(), (400, 32));
    assert_eq!(calls_and_tokens(&stack, &plan).await, (2, 400, 32));
    stack.stop().await;
}

/// A reply cut off at its length is a failed run the provider billed: the
/// task is retried, and the plan's usage counts the cut-off call too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_runs_usage_is_counted() {
    let server = ScriptedOpenAi::start(vec![
        Rule::any().times(1).reply(
            Reply::file("app/a.py", "def a(")
                .finish_reason("length")
                .usage(90, 256),
        ),
        Rule::any().reply(Reply::file("app/a.py", "def a():\n    return 1\n").usage(90, 10)),
    ])
    .await;
    let (stack, plan) = one_task_through_qa(&server, "app/a.py").await;
    assert_eq!(server.requests().len(), 2);
    assert_eq!(
        calls_and_tokens(&stack, &plan).await,
        (2, 180, 266),
        "the cut-off call counts"
    );
    let budget = stack.connections.store.budget(&plan.plan_id).await.unwrap();
    assert_eq!(budget.reserved.tokens, 0);
    stack.stop().await;
}

/// A plan of one task (`path`) through the routed pipeline (scheduler,
/// router, qa-worker) and a dev-worker whose `openai` executor talks to
/// `server`, run until it ends; it must succeed.
async fn one_task_through_qa(
    server: &ScriptedOpenAi,
    path: &str,
) -> (crate::pipeline::Stack, PlanAnalyzed) {
    use crate::pipeline::{analyzed, t, Backend, Stack};
    let mut stack = Stack::new(Backend::Real).await;
    stack.routed_pipeline();
    let openai = OpenAi::new(OpenAiSettings {
        base_url: server.base_url(),
        model: "scripted".into(),
        max_tokens: Some(256),
        ..OpenAiSettings::default()
    })
    .unwrap();
    stack.worker(
        Executors::new(ExecutorKind::Openai).with(ExecutorKind::Openai, Arc::new(openai)),
        1,
        1,
    );
    let plan = analyzed(vec![t(path, &[] as &[&str])], ExecutorKind::Openai);
    stack.submit(&plan).await;
    let record = stack
        .finished(&plan.plan_id, Duration::from_secs(120))
        .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");
    (stack, plan)
}

/// The plan's recorded usage: calls, tokens in, tokens out.
async fn calls_and_tokens(stack: &crate::pipeline::Stack, plan: &PlanAnalyzed) -> (u64, u64, u64) {
    let usage = stack
        .connections
        .store
        .plan_usage(&plan.plan_id)
        .await
        .unwrap();
    (
        usage.total.calls,
        usage.total.tokens_in,
        usage.total.tokens_out,
    )
}
