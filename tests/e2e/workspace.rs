//! Base snapshots and task workspaces through the real analyzer, scheduler
//! and dev-worker over RabbitMQ and Redis: a plan with a `base` directory
//! runs, and the executor finds the base files and its dependencies'
//! artifacts (transitive ones too) in its workspace; changes it makes
//! besides its own file are judged and recorded, and the accepted ones
//! reach its dependents' workspaces, `devfleet pull` and `devfleet status`.

use crate::support::real_connections;
use async_trait::async_trait;
use devfleet_dev_worker::{ExecError, ExecInput, ExecOutput, Executor, Executors};
use devfleet_protocol::{queues, ExecutorKind, Plan, PlanAnalyzed, PlanStatus, PlanSubmitted};
use devfleet_runtime::BusKind;
use devfleet_store::{extra_files, snapshot};
use devfleet_testkit::{unique, within};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Records every file its workspace held when it started, per task; writes
/// its file in place (returning no text), and for `app/api.py` also
/// writes a declared extra file, an undeclared one and edits a base file.
#[derive(Default)]
struct Looking {
    seen: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
}

fn files_under(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(root, &path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.insert(rel, std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
}

#[async_trait]
impl Executor for Looking {
    fn identity(&self) -> String {
        "looking".into()
    }

    async fn run(&self, input: &ExecInput) -> Result<ExecOutput, ExecError> {
        let ws = input
            .workspace
            .clone()
            .ok_or_else(|| ExecError::fatal("no workspace"))?;
        let mut files = BTreeMap::new();
        files_under(&ws, &ws, &mut files);
        self.seen.lock().unwrap().insert(input.path.clone(), files);
        let own = ws.join(&input.path);
        std::fs::create_dir_all(own.parent().unwrap()).unwrap();
        std::fs::write(&own, format!("# built {}\n", input.path)).unwrap();
        if input.path == "app/api.py" {
            std::fs::create_dir_all(ws.join("app/generated")).unwrap();
            std::fs::write(ws.join("app/generated/routes.py"), "ROUTES = []\n").unwrap();
            std::fs::write(ws.join("notes.txt"), "undeclared\n").unwrap();
            std::fs::write(ws.join("lib/util.py"), "edited\n").unwrap();
        }
        Ok(ExecOutput::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_workspace_holds_the_base_and_its_dependencies_over_rabbitmq() {
    let connections = real_connections(BusKind::Amqp).await;
    let base = tempfile::tempdir().unwrap();
    let b = base.path();
    std::fs::create_dir_all(b.join("lib")).unwrap();
    std::fs::write(b.join("lib/__init__.py"), "").unwrap();
    std::fs::write(b.join("lib/util.py"), "def helper():\n    return 42\n").unwrap();
    std::fs::write(b.join(".gitignore"), "secret.txt\n").unwrap();
    std::fs::write(b.join("secret.txt"), "do not ship\n").unwrap();

    // What `devfleet publish` does with a plan's base.
    let built = snapshot::build(b, snapshot::Limits::default()).unwrap();
    let snapshot_id = built.store(connections.store.as_ref()).await.unwrap();
    let mut plan = Plan::parse(
        r#"
name: over-a-base
base: ./base
tasks:
  - { path: app/db.py, spec: db }
  - { path: app/models.py, spec: models, depends_on: [app/db.py] }
  - path: app/api.py
    spec: api
    content: "from lib.util import helper\n"
    depends_on: [app/models.py]
    writes: ["app/generated/*.py"]
  - { path: app/main.py, spec: main, depends_on: [app/api.py] }
"#,
    )
    .unwrap();
    plan.base_snapshot = Some(snapshot_id.clone());

    let shutdown = CancellationToken::new();
    let mut services = tokio::task::JoinSet::new();
    services.spawn(devfleet_analyzer::service::run(
        devfleet_analyzer::service::Config::new(connections.clone()),
        shutdown.clone(),
    ));
    let mut scheduler = devfleet_scheduler::Config::new(connections.clone());
    scheduler.direct_routing = true;
    scheduler.dispatch_tick = Duration::from_millis(10);
    services.spawn(devfleet_scheduler::run(scheduler, shutdown.clone()));
    let looking = Arc::new(Looking::default());
    let work_dir = tempfile::tempdir().unwrap();
    let mut worker = devfleet_dev_worker::Config::new(connections.clone());
    worker.executors =
        Executors::new(ExecutorKind::Builtin).with(ExecutorKind::Builtin, looking.clone());
    worker.work_dir = work_dir.path().to_path_buf();
    services.spawn(devfleet_dev_worker::run(worker, shutdown.clone()));

    let plan_id = unique("plan");
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
    let record = crate::support::plan_where(
        &connections,
        &plan_id,
        "end",
        Duration::from_secs(60),
        |p| p.status.is_final(),
    )
    .await;
    assert_eq!(record.status, PlanStatus::Succeeded, "{record:?}");

    let seen = looking.seen.lock().unwrap().clone();
    let api = &seen["app/api.py"];
    assert_eq!(
        api["lib/util.py"], "def helper():\n    return 42\n",
        "the base"
    );
    assert!(api.contains_key("lib/__init__.py"));
    assert!(
        !api.contains_key("secret.txt"),
        "ignored files are not in the snapshot"
    );
    assert_eq!(
        api["app/models.py"], "# built app/models.py\n",
        "a dependency"
    );
    assert_eq!(
        api["app/db.py"], "# built app/db.py\n",
        "a transitive dependency"
    );
    assert!(
        !seen["app/db.py"].contains_key("app/models.py"),
        "only dependencies"
    );

    // The task's file is what the executor wrote at its path.
    let store = &connections.store;
    let task = store.task(&plan_id, "app/api.py").await.unwrap().unwrap();
    let text = store
        .artifact(&task.artifact.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text, b"# built app/api.py\n");

    // The analyzer recorded the base file the task imports.
    let detail: PlanAnalyzed = serde_json::from_str(&record.detail).unwrap();
    assert_eq!(
        detail.plan.base_snapshot.as_deref(),
        Some(snapshot_id.as_str())
    );
    let api_task = detail
        .tasks
        .iter()
        .find(|t| t.path == "app/api.py")
        .unwrap();
    assert_eq!(api_task.base_imports, ["lib/util.py"]);

    // Every other change is recorded with its verdict.
    let changes = extra_files::decisions(store.as_ref(), &plan_id, "app/api.py")
        .await
        .unwrap();
    let verdict = |path: &str| {
        changes
            .iter()
            .find(|c| c.path == path)
            .unwrap_or_else(|| panic!("{path} not recorded: {changes:?}"))
            .clone()
    };
    assert!(verdict("app/generated/routes.py").accepted);
    assert!(!verdict("notes.txt").accepted);
    assert_eq!(verdict("lib/util.py").reason, "a file of the base snapshot");
    assert_eq!(changes.len(), 3, "{changes:?}");

    // The accepted file is in the dependent's workspace...
    assert_eq!(
        seen["app/main.py"]["app/generated/routes.py"], "ROUTES = []\n",
        "a dependency's extra file"
    );
    // ...and in the plan's tree: `devfleet pull` writes it, not the
    // rejected ones; `devfleet status` shows every verdict.
    let out = tempfile::tempdir().unwrap();
    let pulled = crate::support::cli(
        &connections,
        &["pull", &plan_id, "--out", out.path().to_str().unwrap()],
    );
    assert!(
        pulled.contains("wrote 5 files") && pulled.contains("1 of them extra"),
        "{pulled}"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("app/generated/routes.py")).unwrap(),
        "ROUTES = []\n"
    );
    assert!(!out.path().join("notes.txt").exists());
    assert!(
        !out.path().join("lib/util.py").exists(),
        "base files are not pulled"
    );
    let status = crate::support::cli(&connections, &["status", &plan_id]);
    assert!(
        status.contains("app/api.py: write app/generated/routes.py accepted")
            && status.contains(
                "app/api.py: write notes.txt REJECTED: not declared in the task's `writes:`"
            )
            && status
                .contains("app/api.py: write lib/util.py REJECTED: a file of the base snapshot"),
        "{status}"
    );

    shutdown.cancel();
    within("services to stop", Duration::from_secs(30), async {
        while let Some(joined) = services.join_next().await {
            joined.expect("service panicked").expect("service failed");
        }
    })
    .await;
}
