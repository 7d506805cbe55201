//! The qa-worker service: checks each built file in a sandbox, and runs
//! integration-test shards.
//!
//! # QA (`work.qa` → `qa.results`)
//!
//! For each [`QaWork`]: the file's artifact and the artifacts of every task
//! it depends on (transitively) are written to a temporary workspace
//! ([`workspace`]); the checks configured for its extension ([`checks`])
//! run one after another in the sandbox ([`sandbox`]); the verdict, every
//! check's status and output, and trimmed diagnostics of the failing ones
//! are published as a [`QaResult`]. A check whose program is missing is
//! recorded `skipped` with the reason; a file no check applies to gets one
//! `skipped` check named `none`. When the checks cannot run at all (an
//! artifact is missing, the sandbox cannot start) the worker publishes
//! `task.failed` with stage `qa` instead, which the router retries and
//! counts against the QA circuit breaker.
//!
//! # Integration (`work.integration` → `integration.results`)
//!
//! For each [`IntegrationWork`] shard: the whole plan's files are written
//! to a workspace and the step's command runs there, sandboxed, split per
//! [`integration`]'s rules; the outcome is an [`IntegrationResult`].
//!
//! # Guarantees
//!
//! * A delivery is acked only after its result is confirmed by the broker;
//!   on shutdown, running checks are killed and their deliveries handed
//!   back for another worker.
//! * Up to `concurrency` checks or shards run at once, each on its own
//!   slot (with its own sandbox uid when running as root).
//! * A stale request (the task moved on) is acked without a result.

use devfleet_bus::ConsumeOptions;
use devfleet_protocol::{
    queues, CheckResult, Envelope, IntegrationResult, IntegrationWork, Message, MetricType,
    QaResult, QaWork, Stage, TaskFailed,
};
use devfleet_runtime::consume::{self, Consume, Settlement, Slots};
use devfleet_runtime::{Connections, Metrics};
use devfleet_store::{StoreError, TaskState};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub mod checks;
pub mod integration;
pub mod sandbox;
pub mod workspace;

pub use checks::CheckSpec;
pub use integration::{shards, IntegrationTally, TallyState};
pub use sandbox::{Limits, Sandbox, SandboxMode, SandboxSettings};

use workspace::{MaterialiseError, Workspace};

/// Settings of the qa-worker service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
    /// Name of this worker in metrics and logs.
    pub instance: String,
    /// The checks, by file extension.
    pub checks: Vec<CheckSpec>,
    pub sandbox: SandboxSettings,
    /// Checks and shards run at once.
    pub concurrency: usize,
    /// Wall timeout of one check (unless the check sets its own).
    pub check_timeout: Duration,
    /// Wall timeout of one integration shard (unless the step sets its own).
    pub integration_timeout: Duration,
    /// Where workspaces are created.
    pub work_dir: PathBuf,
    /// Longest diagnostics text put on a QA result (and so on a fix task).
    pub diagnostics_bytes: usize,
    /// Deliveries of one message (transient failures) before it is
    /// dead-lettered.
    pub max_handler_attempts: u32,
}

impl Config {
    /// Defaults that work on loopback; the embedded mode uses them as is.
    pub fn new(connections: Connections) -> Self {
        Self {
            connections,
            instance: devfleet_runtime::instance_name("qa-worker"),
            checks: checks::default_checks(),
            sandbox: SandboxSettings::default(),
            concurrency: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(2, 8),
            check_timeout: Duration::from_secs(60),
            integration_timeout: Duration::from_secs(600),
            work_dir: std::env::temp_dir(),
            diagnostics_bytes: 8 * 1024,
            max_handler_attempts: 20,
        }
    }

    /// Checks the settings; errors name the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.concurrency >= 1,
            "--concurrency (DEVFLEET_QA_CONCURRENCY) must be at least 1"
        );
        anyhow::ensure!(
            !self.check_timeout.is_zero() && !self.integration_timeout.is_zero(),
            "--check-timeout-secs and --integration-timeout-secs must be positive"
        );
        for c in &self.checks {
            checks::validate(c)?;
        }
        Ok(())
    }
}

/// What every part of a running worker shares.
struct Worker {
    connections: Connections,
    metrics: Metrics,
    checks: Vec<CheckSpec>,
    sandbox: Sandbox,
    check_timeout: Duration,
    integration_timeout: Duration,
    work_dir: PathBuf,
    diagnostics_bytes: usize,
    /// Free slot numbers (each maps to a sandbox uid).
    slots: Mutex<Vec<u32>>,
}

impl Worker {
    fn take_slot(&self) -> Slot<'_> {
        let n = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or(0);
        Slot { worker: self, n }
    }
}

/// A slot in use; returned to the pool on drop.
struct Slot<'a> {
    worker: &'a Worker,
    n: u32,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.worker
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.n);
    }
}

/// Runs the service until `shutdown` is cancelled. Checks still running
/// then are killed and their deliveries handed back.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    std::fs::create_dir_all(&config.work_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the work dir {} (DEVFLEET_QA_WORK_DIR): {e}",
            config.work_dir.display()
        )
    })?;
    let n = config.concurrency;
    let sandbox = Sandbox::detect(config.sandbox.clone(), n).await?;
    let worker = Arc::new(Worker {
        metrics: config.connections.metrics(config.instance.clone()),
        connections: config.connections.clone(),
        checks: config.checks.clone(),
        sandbox,
        check_timeout: config.check_timeout,
        integration_timeout: config.integration_timeout,
        work_dir: config.work_dir.clone(),
        diagnostics_bytes: config.diagnostics_bytes,
        slots: Mutex::new((0..n as u32).rev().collect()),
    });
    tracing::info!(
        instance = %config.instance,
        isolation = worker.sandbox.isolation(),
        concurrency = n,
        "qa-worker starting"
    );
    // Both queues share the slots: `n` checks or shards at once in all.
    let slots = Slots::new(u32::try_from(n).unwrap_or(u32::MAX));
    let mut parts = JoinSet::new();
    let options = ConsumeOptions::default()
        .max_attempts(config.max_handler_attempts)
        .ack_wait(config.integration_timeout + Duration::from_secs(60));
    // On shutdown running checks are killed and their deliveries handed
    // back at once, for another worker.
    let consume = |queue: &str| {
        Consume::new(config.connections.clone(), queue)
            .options(options.clone())
            .slots(slots.clone())
            .grace(Duration::ZERO)
    };
    parts.spawn(consume(queues::WORK_QA).run(
        worker.clone(),
        shutdown.clone(),
        |worker, envelope, _| handle_qa(worker, envelope),
    ));
    parts.spawn(consume(queues::WORK_INTEGRATION).run(
        worker.clone(),
        shutdown.clone(),
        |worker, envelope, _| handle_integration(worker, envelope),
    ));
    parts.spawn(report_health(worker.clone(), n, shutdown.clone()));
    let mut result = Ok(());
    while let Some(joined) = parts.join_next().await {
        let outcome = joined
            .map_err(|e| anyhow::anyhow!("a qa-worker task panicked: {e}"))
            .and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %e, "qa-worker part failed; stopping");
            if result.is_ok() {
                result = Err(e);
            }
            shutdown.cancel();
        }
    }
    tracing::info!("qa-worker stopped");
    result
}

/// Reports the sandbox in use (loudly when there is none) now and then.
async fn report_health(
    worker: Arc<Worker>,
    slots: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let isolation = worker.sandbox.isolation();
        worker
            .metrics
            .emit(
                MetricType::SystemHealth,
                serde_json::json!({
                    "component": "qa_sandbox",
                    "isolation": isolation,
                    "healthy": isolation != "none",
                    "warning": (isolation == "none").then_some(
                        "QA checks run without filesystem or network isolation (bubblewrap missing)"
                    ),
                    "slots": slots,
                }),
            )
            .await;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

/// Trims text to `max` bytes keeping the start (where compilers put the
/// first error) and marking the cut.
pub fn trim(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n… ({} more bytes)", &text[..end], text.len() - end)
}

async fn handle_qa(worker: Arc<Worker>, envelope: Envelope) -> Settlement {
    let Message::QaWork(work) = envelope.message else {
        return consume::unexpected(&envelope, queues::WORK_QA);
    };
    let store = worker.connections.store.as_ref();
    let task = match store.task(&work.plan_id, &work.path).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            return Settlement::DeadLetter(format!(
                "task '{}' of plan '{}' does not exist",
                work.path, work.plan_id
            ))
        }
        Err(e) => return Settlement::from_store_error("reading the task", e),
    };
    if task.state != TaskState::Built || task.artifact.as_deref() != Some(work.artifact.as_str()) {
        tracing::info!(
            state = task.state.as_str(),
            "stale QA work: the task moved on"
        );
        return Settlement::Ack;
    }
    let result = match check_file(&worker, &work).await {
        Ok(r) => r,
        Err(CheckError::Store(e)) => {
            return Settlement::from_store_error("preparing the workspace", e)
        }
        Err(CheckError::Infra(error)) => {
            tracing::warn!(%error, "QA could not run");
            let failed = TaskFailed {
                plan_id: work.plan_id.clone(),
                path: work.path.clone(),
                attempt: work.attempt,
                stage: Stage::Qa,
                error,
                retryable: true,
            };
            return match worker
                .connections
                .publish(queues::TASK_FAILED, failed)
                .await
            {
                Ok(()) => Settlement::Ack,
                Err(e) => Settlement::from_publish_error("publishing task.failed", e),
            };
        }
    };
    tracing::info!(
        passed = result.passed,
        checks = result.checks.len(),
        "QA verdict"
    );
    match worker.connections.publish(queues::QA_RESULTS, result).await {
        Ok(()) => Settlement::Ack,
        Err(e) => Settlement::from_publish_error("publishing the QA result", e),
    }
}

enum CheckError {
    /// The store failed (transient): retry the delivery.
    Store(StoreError),
    /// The checks could not run: a QA-stage failure.
    Infra(String),
}

impl From<MaterialiseError> for CheckError {
    fn from(e: MaterialiseError) -> Self {
        match e {
            MaterialiseError::Store(s @ (StoreError::Backend(_) | StoreError::Connect { .. })) => {
                CheckError::Store(s)
            }
            other => CheckError::Infra(format!("cannot prepare the QA workspace: {other}")),
        }
    }
}

async fn check_file(worker: &Worker, work: &QaWork) -> Result<QaResult, CheckError> {
    let store = worker.connections.store.as_ref();
    let tasks = workspace::plan_tasks(store, &work.plan_id)
        .await
        .map_err(MaterialiseError::from)?;
    let mut deps = Vec::new();
    for d in workspace::dependency_closure(&tasks, &work.path) {
        if let Some(t) = tasks.get(&d) {
            deps.push(t.clone());
        }
    }
    let ws = Workspace::create(&worker.work_dir)
        .map_err(|e| CheckError::Infra(format!("cannot create a workspace: {e}")))?;
    workspace::materialise(store, &ws, Some((&work.path, &work.artifact)), deps.iter()).await?;
    let slot = worker.take_slot();
    worker
        .sandbox
        .prepare_workspace(ws.root(), slot.n)
        .map_err(|e| CheckError::Infra(format!("cannot hand the workspace to the sandbox: {e}")))?;

    let applicable = checks::for_path(&worker.checks, &work.path);
    let mut results = Vec::new();
    if applicable.is_empty() {
        results.push(CheckResult {
            name: "none".into(),
            status: "skipped".into(),
            output: format!(
                "no checks are configured for {} files; the file was not checked",
                match checks::extension(&work.path).as_str() {
                    "" => "extension-less".to_owned(),
                    e => format!(".{e}"),
                }
            ),
            duration_ms: 0,
        });
    }
    for check in applicable {
        let words =
            checks::command_for(check, &work.path).map_err(|e| CheckError::Infra(e.to_string()))?;
        let program = words.first().cloned().unwrap_or_default();
        if !worker.sandbox.has_program(&program) {
            if !check.optional {
                tracing::warn!(check = %check.name, %program, "a required QA check's program is not installed");
            }
            results.push(CheckResult {
                name: check.name.clone(),
                status: "skipped".into(),
                output: format!(
                    "{program} is not installed{}",
                    if check.optional {
                        ""
                    } else {
                        " (a required check: install it)"
                    }
                ),
                duration_ms: 0,
            });
            continue;
        }
        let timeout = check
            .timeout_seconds
            .map(Duration::from_secs)
            .unwrap_or(worker.check_timeout);
        let outcome = worker
            .sandbox
            .run(slot.n, &words, ws.root(), &[], timeout)
            .await;
        let status = match &outcome.exit {
            sandbox::Exit::Success => "passed",
            sandbox::Exit::Code(_) | sandbox::Exit::Signal(_) => "failed",
            sandbox::Exit::Timeout => "timeout",
            sandbox::Exit::SpawnFailed(e) => {
                return Err(CheckError::Infra(format!(
                    "check '{}' could not start: {e}",
                    check.name
                )))
            }
        };
        let host_root = ws.root().display().to_string();
        let output = outcome
            .output
            .replace(&host_root, sandbox::SANDBOX_WORKSPACE);
        worker
            .metrics
            .emit(
                MetricType::Performance,
                serde_json::json!({
                    "stage": "qa",
                    "check": check.name,
                    "status": status,
                    "duration_ms": outcome.duration.as_millis() as u64,
                    "sandbox": worker.sandbox.isolation(),
                }),
            )
            .await;
        results.push(CheckResult {
            name: check.name.clone(),
            status: status.into(),
            output: if status == "passed" {
                trim(&output, 2_000)
            } else {
                trim(
                    &format!("{}\n{}", outcome.describe(), output),
                    worker.diagnostics_bytes,
                )
            },
            duration_ms: outcome.duration.as_millis() as u64,
        });
    }
    let passed = results
        .iter()
        .all(|c| c.status == "passed" || c.status == "skipped");
    let diagnostics = trim(
        &results
            .iter()
            .filter(|c| c.status != "passed" && c.status != "skipped")
            .map(|c| format!("== {} ({}) ==\n{}", c.name, c.status, c.output.trim_end()))
            .collect::<Vec<_>>()
            .join("\n\n"),
        worker.diagnostics_bytes,
    );
    Ok(QaResult {
        plan_id: work.plan_id.clone(),
        path: work.path.clone(),
        attempt: work.attempt,
        artifact: work.artifact.clone(),
        passed,
        diagnostics,
        checks: results,
    })
}

async fn handle_integration(worker: Arc<Worker>, envelope: Envelope) -> Settlement {
    let Message::IntegrationWork(work) = envelope.message else {
        return consume::unexpected(&envelope, queues::WORK_INTEGRATION);
    };
    if work.shard_count == 0 || work.shard_index >= work.shard_count {
        return Settlement::DeadLetter(format!(
            "integration step '{}': shard {} of {} does not exist",
            work.step.name, work.shard_index, work.shard_count
        ));
    }
    let result = match run_shard(&worker, &work).await {
        Ok(r) => r,
        Err(CheckError::Store(e)) => {
            return Settlement::from_store_error("preparing the workspace", e)
        }
        Err(CheckError::Infra(error)) => IntegrationResult {
            plan_id: work.plan_id.clone(),
            step: work.step.name.clone(),
            shard_index: work.shard_index,
            shard_count: work.shard_count,
            passed: false,
            output: error,
            duration_ms: 0,
        },
    };
    tracing::info!(step = %result.step, shard = result.shard_index, passed = result.passed, "integration shard finished");
    match worker
        .connections
        .publish(queues::INTEGRATION_RESULTS, result)
        .await
    {
        Ok(()) => Settlement::Ack,
        Err(e) => Settlement::from_publish_error("publishing the integration result", e),
    }
}

async fn run_shard(
    worker: &Worker,
    work: &IntegrationWork,
) -> Result<IntegrationResult, CheckError> {
    let store = worker.connections.store.as_ref();
    let started = Instant::now();
    let tasks = workspace::plan_tasks(store, &work.plan_id)
        .await
        .map_err(MaterialiseError::from)?;
    let ws = Workspace::create(&worker.work_dir)
        .map_err(|e| CheckError::Infra(format!("cannot create a workspace: {e}")))?;
    workspace::materialise(store, &ws, None, tasks.values()).await?;
    let slot = worker.take_slot();
    worker
        .sandbox
        .prepare_workspace(ws.root(), slot.n)
        .map_err(|e| CheckError::Infra(format!("cannot hand the workspace to the sandbox: {e}")))?;
    let result = |passed: bool, output: String, started: Instant| IntegrationResult {
        plan_id: work.plan_id.clone(),
        step: work.step.name.clone(),
        shard_index: work.shard_index,
        shard_count: work.shard_count,
        passed,
        output,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let Some(mut words) = shlex::split(&work.step.run).filter(|w| !w.is_empty()) else {
        return Ok(result(
            false,
            format!(
                "integration step '{}': the command is empty or has unbalanced quotes",
                work.step.name
            ),
            started,
        ));
    };
    if work.shard_count > 1 && integration::is_pytest(&words) {
        let files = integration::shard_files(
            &integration::list_files(ws.root()),
            work.shard_index,
            work.shard_count,
        );
        if files.is_empty() {
            return Ok(result(
                true,
                format!(
                    "no test files fall to shard {}/{}; nothing to run",
                    work.shard_index + 1,
                    work.shard_count
                ),
                started,
            ));
        }
        words.extend(files);
    }
    let timeout = work
        .step
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(worker.integration_timeout);
    let mut limits = worker.sandbox.settings().limits.clone();
    limits.cpu_seconds = limits.cpu_seconds.max(timeout.as_secs() + 1);
    let env = vec![
        (
            "DEVFLEET_SHARD_INDEX".to_owned(),
            work.shard_index.to_string(),
        ),
        (
            "DEVFLEET_SHARD_COUNT".to_owned(),
            work.shard_count.to_string(),
        ),
        ("DEVFLEET_PLAN_ID".to_owned(), work.plan_id.clone()),
    ];
    let outcome = worker
        .sandbox
        .run_with(slot.n, &words, ws.root(), &env, timeout, limits)
        .await;
    if let sandbox::Exit::SpawnFailed(e) = &outcome.exit {
        return Err(CheckError::Infra(format!(
            "integration step '{}' could not start: {e}",
            work.step.name
        )));
    }
    let host_root = ws.root().display().to_string();
    let output = format!(
        "$ {}\n{}\n{}",
        words.join(" "),
        outcome
            .output
            .replace(&host_root, sandbox::SANDBOX_WORKSPACE),
        outcome.describe()
    );
    worker
        .metrics
        .emit(
            MetricType::Performance,
            serde_json::json!({
                "stage": "integration",
                "step": work.step.name,
                "shard": work.shard_index,
                "passed": outcome.exit == sandbox::Exit::Success,
                "duration_ms": outcome.duration.as_millis() as u64,
                "sandbox": worker.sandbox.isolation(),
            }),
        )
        .await;
    Ok(result(
        outcome.exit == sandbox::Exit::Success,
        trim(&output, 64 * 1024),
        started,
    ))
}
