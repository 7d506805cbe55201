//! QA of one built file (`work.qa` → `qa.results`): the handler and the
//! checks run in the sandbox.

use crate::checks;
use crate::sandbox;
use crate::workspace::{self, MaterialiseError, Workspace};
use crate::Worker;
use devfleet_protocol::metrics::QaCheckTiming;
use devfleet_protocol::{
    queues, CheckResult, Envelope, Message, QaResult, QaWork, Stage, TaskFailed,
};
use devfleet_runtime::consume::{self, Inflight, Settlement};
use devfleet_store::{StoreError, TaskState};
use std::sync::Arc;
use std::time::Duration;

use devfleet_protocol::trim_text as trim;

pub(crate) async fn handle_qa(
    worker: Arc<Worker>,
    envelope: Envelope,
    inflight: Inflight,
) -> Settlement {
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
    // Checks may outlive RabbitMQ's consumer_timeout: a check still running
    // after `settle_after` settles its delivery there (a worker dying from
    // then on leaves the task Built, for the watchdog); a shorter one keeps
    // it, so a dead worker's check is redelivered at once.
    let _guard = inflight.guard_after(worker.settle_after);
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

pub(crate) enum CheckError {
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
    // The task itself, for the extra files it wrote (its own file is the
    // artifact under check).
    if let Some(t) = tasks.get(&work.path) {
        deps.push(t.clone());
    }
    let ws = Workspace::create(&worker.work_dir)
        .map_err(|e| CheckError::Infra(format!("cannot create a workspace: {e}")))?;
    let writers = workspace::write_base(store, &ws, &work.plan_id).await?;
    workspace::materialise(
        store,
        &ws,
        Some((&work.path, &work.artifact)),
        deps.iter(),
        writers.as_ref(),
    )
    .await?;
    let slot = worker.slots.take();
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
            .emit(QaCheckTiming {
                check: check.name.clone(),
                status: status.to_owned(),
                duration_ms: outcome.duration.as_millis() as u64,
                sandbox: worker.sandbox.isolation().to_owned(),
            })
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
