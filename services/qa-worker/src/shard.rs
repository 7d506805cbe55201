//! One integration-test shard (`work.integration` →
//! `integration.results`): the handler and the sandboxed run, split per
//! [`integration`]'s rules.

use crate::integration;
use crate::qa::CheckError;
use crate::sandbox;
use crate::workspace::{self, MaterialiseError, Workspace};
use crate::Worker;
use devfleet_protocol::metrics::IntegrationTiming;
use devfleet_protocol::plan::MAX_TIMEOUT_SECONDS;
use devfleet_protocol::trim_text as trim;
use devfleet_protocol::{
    queues, Envelope, IntegrationResult, IntegrationStep, IntegrationWork, Message,
};
use devfleet_runtime::consume::{self, Inflight, Settlement};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) async fn handle_integration(
    worker: Arc<Worker>,
    envelope: Envelope,
    inflight: Inflight,
) -> Settlement {
    let Message::IntegrationWork(work) = envelope.message else {
        return consume::unexpected(&envelope, queues::WORK_INTEGRATION);
    };
    if work.shard_count == 0 || work.shard_index >= work.shard_count {
        return Settlement::DeadLetter(format!(
            "integration step '{}': shard {} of {} does not exist",
            work.step.name, work.shard_index, work.shard_count
        ));
    }
    // Shards may outlive RabbitMQ's consumer_timeout: one still running
    // after `settle_after` settles its delivery there (a worker dying from
    // then on leaves the plan integrating, for the watchdog).
    let _guard = inflight.guard_after(worker.settle_after);
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
    let writers = workspace::write_base(store, &ws, &work.plan_id).await?;
    workspace::materialise(store, &ws, None, tasks.values(), writers.as_ref()).await?;
    let slot = worker.slots.take();
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
    // A program this worker lacks fails the step at once, saying so, rather
    // than as a test failure (it is the worker's environment, not the code).
    if !worker.sandbox.has_program(&words[0]) {
        return Ok(result(
            false,
            format!(
                "integration step '{}' runs `{}`, which is not installed on this qa-worker \
                 (install it there, e.g. with the system's package manager, or declare \
                 `requires: [{}]` on the step; see docs/AGENTS.md \"Capabilities\")",
                work.step.name, words[0], words[0]
            ),
            started,
        ));
    }
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
    let (timeout, limits) = shard_limits(
        &work.step,
        worker.integration_timeout,
        &worker.sandbox.settings().limits,
    );
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
        .emit(IntegrationTiming {
            step: work.step.name.clone(),
            shard: work.shard_index,
            passed: outcome.exit == sandbox::Exit::Success,
            duration_ms: outcome.duration.as_millis() as u64,
            sandbox: worker.sandbox.isolation().to_owned(),
        })
        .await;
    Ok(result(
        outcome.exit == sandbox::Exit::Success,
        trim(&output, 64 * 1024),
        started,
    ))
}

/// The wall timeout of a shard and the limits it runs under: the step's
/// `timeout_seconds`, else the worker's `default`, with CPU time to match.
/// The step's value is capped at [`MAX_TIMEOUT_SECONDS`] here too: a
/// message that skipped the plan checks (`timeout_seconds` near
/// `u64::MAX`) must not overflow the arithmetic on it.
fn shard_limits(
    step: &IntegrationStep,
    default: Duration,
    limits: &sandbox::Limits,
) -> (Duration, sandbox::Limits) {
    let timeout = step
        .timeout_seconds
        .map(|s| Duration::from_secs(s.min(MAX_TIMEOUT_SECONDS)))
        .unwrap_or(default);
    let mut limits = limits.clone();
    limits.cpu_seconds = limits.cpu_seconds.max(timeout.as_secs().saturating_add(1));
    (timeout, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_near_u64_max_is_capped_without_overflow() {
        let step = IntegrationStep {
            requires: Vec::new(),
            name: "unit".into(),
            run: "pytest".into(),
            shard: None,
            timeout_seconds: Some(u64::MAX),
        };
        let default = Duration::from_secs(600);
        let (timeout, limits) = shard_limits(&step, default, &sandbox::Limits::default());
        assert_eq!(timeout, Duration::from_secs(MAX_TIMEOUT_SECONDS));
        assert_eq!(limits.cpu_seconds, MAX_TIMEOUT_SECONDS + 1);
        let (timeout, limits) = shard_limits(
            &IntegrationStep {
                timeout_seconds: None,
                ..step
            },
            default,
            &sandbox::Limits::default(),
        );
        assert_eq!((timeout, limits.cpu_seconds), (default, 601));
    }
}
