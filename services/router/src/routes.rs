//! The routes: `task.built`, `task.failed` and `qa.results` handlers, QA
//! dispatch behind the QA breaker, dead-lettering, and the periodic tick.

use crate::dlq::{self, DlqEntry, DlqSource};
use crate::history::{self, task_key, HistoryEntry};
use crate::retry;
use crate::{Config, Router};
use devfleet_bus::ConsumeOptions;
use devfleet_contracts::breaker::Attempt;
use devfleet_protocol::{
    metrics::{self, TaskFixing, TaskRetrying},
    now_ms, queues, Escalation, QaResult, QaWork, Stage, TaskBuilt, TaskClass, TaskDone,
    TaskFailed, TaskFinallyFailed,
};
use devfleet_protocol::{Envelope, Message};
use devfleet_runtime::consume::{self, Settlement, Source, StepError};
use devfleet_store::{Fence, TaskRecord, TaskState};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Store collection of QA work held back by an open QA breaker, keyed by
/// task key, value [`QaWork`] JSON.
pub const QA_PARKED: &str = "qa_parked";

/// How often breaker states are reported as `system_health`.
const HEALTH_EVERY: Duration = Duration::from_secs(5);

/// Starts the consumers of every queue the router reads.
pub(crate) fn spawn(
    parts: &mut JoinSet<anyhow::Result<()>>,
    router: &Arc<Router>,
    config: &Config,
    stop: &CancellationToken,
) {
    let n = config.handler_concurrency;
    let options = ConsumeOptions::default().max_attempts(config.max_handler_attempts);
    let source = |queue: &'static str, options: ConsumeOptions| Source {
        connections: config.connections.clone(),
        queue,
        options,
        concurrency: n,
    };
    parts.spawn(consume::consume(
        source(queues::TASK_BUILT, options.clone()),
        router.clone(),
        stop.clone(),
        handle_built,
    ));
    parts.spawn(consume::consume(
        source(queues::TASK_FAILED, options.clone()),
        router.clone(),
        stop.clone(),
        handle_failed,
    ));
    parts.spawn(consume::consume(
        source(queues::QA_RESULTS, options),
        router.clone(),
        stop.clone(),
        handle_qa_result,
    ));
    // Tickets wait by redelivery, so their delivery count says nothing
    // about failures: never dead-letter them for it.
    parts.spawn(consume::consume(
        source(
            retry::RETRY_QUEUE,
            ConsumeOptions::default().max_attempts(0),
        ),
        router.clone(),
        stop.clone(),
        retry::handle_ticket,
    ));
}

/// The task as the store has it, or the settlement for a message about a
/// task that does not exist.
async fn load(router: &Router, plan_id: &str, path: &str) -> Result<TaskRecord, Settlement> {
    match router.connections.store.task(plan_id, path).await {
        Ok(Some(t)) => Ok(t),
        Ok(None) => Err(Settlement::DeadLetter(format!(
            "task '{path}' of plan '{plan_id}' does not exist"
        ))),
        Err(e) => Err(Settlement::from_store_error("reading the task", e)),
    }
}

fn record_fields(plan_id: &str, path: &str, attempt: u32) {
    let span = tracing::Span::current();
    span.record("plan_id", plan_id);
    span.record("path", path);
    span.record("attempt", attempt);
}

/// `task.built` → QA.
#[tracing::instrument(skip_all, fields(plan_id = tracing::field::Empty, path = tracing::field::Empty, attempt = tracing::field::Empty))]
pub(crate) async fn handle_built(router: Arc<Router>, envelope: Envelope) -> Settlement {
    let Message::TaskBuilt(built) = envelope.message else {
        return consume::unexpected(&envelope, queues::TASK_BUILT);
    };
    record_fields(&built.plan_id, &built.path, built.attempt);
    let task = match load(&router, &built.plan_id, &built.path).await {
        Ok(t) => t,
        Err(s) => return s,
    };
    if !is_current_build(&task, &built) {
        tracing::info!(
            state = task.state.as_str(),
            "stale task.built: the task moved on; nothing to do"
        );
        return Settlement::Ack;
    }
    // Only an executor run says the dev stage works; a cache hit or a
    // re-announcement ran nothing.
    if built.ran_executor() {
        let attempt = attempt_of(&built.plan_id, &built.path, built.attempt);
        if let Err(e) = router.breakers.record(Stage::Dev, attempt, true).await {
            tracing::warn!(error = %e, "cannot record a dev success in the breaker");
        }
    }
    let work = QaWork {
        plan_id: built.plan_id,
        path: built.path,
        attempt: built.attempt,
        artifact: built.artifact,
    };
    match dispatch_qa(&router, work).await {
        Ok(()) => Settlement::Ack,
        Err(e) => e.settlement("dispatching QA"),
    }
}

fn attempt_of<'a>(plan_id: &'a str, path: &'a str, attempt: u32) -> Attempt<'a> {
    Attempt {
        plan_id,
        path,
        attempt,
    }
}

fn is_current_build(task: &TaskRecord, built: &TaskBuilt) -> bool {
    task.state == TaskState::Built
        && task.attempt == built.attempt
        && task.artifact.as_deref() == Some(built.artifact.as_str())
}

/// Publishes QA work, or parks it while the QA breaker does not admit it.
pub(crate) async fn dispatch_qa(router: &Router, work: QaWork) -> Result<(), StepError> {
    let attempt = attempt_of(&work.plan_id, &work.path, work.attempt);
    if router.breakers.admit(Stage::Qa, attempt).await? {
        router
            .connections
            .publish(queues::WORK_QA, work)
            .await
            .map_err(StepError::Publish)
    } else {
        let key = task_key(&work.plan_id, &work.path);
        let json = serde_json::to_string(&work).map_err(|e| StepError::Invalid(e.to_string()))?;
        router
            .connections
            .store
            .kv_put(QA_PARKED, &key, &json, None)
            .await?;
        tracing::info!(plan_id = %work.plan_id, path = %work.path, "QA breaker open: QA work parked");
        Ok(())
    }
}

/// `qa.results` → done, or a fix task, or a dead letter.
#[tracing::instrument(skip_all, fields(plan_id = tracing::field::Empty, path = tracing::field::Empty, attempt = tracing::field::Empty))]
pub(crate) async fn handle_qa_result(router: Arc<Router>, envelope: Envelope) -> Settlement {
    let Message::QaResult(result) = envelope.message else {
        return consume::unexpected(&envelope, queues::QA_RESULTS);
    };
    record_fields(&result.plan_id, &result.path, result.attempt);
    let task = match load(&router, &result.plan_id, &result.path).await {
        Ok(t) => t,
        Err(s) => return s,
    };
    if task.state != TaskState::Built
        || task.attempt != result.attempt
        || task.artifact.as_deref() != Some(result.artifact.as_str())
    {
        if let Some(settlement) = report_again_if_dead(&router, &task, result.attempt).await {
            return settlement;
        }
        tracing::info!(
            state = task.state.as_str(),
            "stale QA result: the task moved on"
        );
        return Settlement::Ack;
    }
    // A current verdict, either way, means the QA stage works.
    let attempt = attempt_of(&result.plan_id, &result.path, result.attempt);
    if let Err(e) = router.breakers.record(Stage::Qa, attempt, true).await {
        tracing::warn!(error = %e, "cannot record a QA success in the breaker");
    }
    let outcome = if result.passed {
        passed(&router, &result).await
    } else {
        qa_failed(&router, &task, &result).await
    };
    match outcome {
        Ok(()) => Settlement::Ack,
        Err(e) => e.settlement("routing the QA result"),
    }
}

async fn passed(router: &Router, result: &QaResult) -> Result<(), StepError> {
    router
        .connections
        .publish(
            queues::TASK_DONE,
            TaskDone {
                plan_id: result.plan_id.clone(),
                path: result.path.clone(),
                attempt: result.attempt,
                artifact: result.artifact.clone(),
            },
        )
        .await
        .map_err(StepError::Publish)?;
    // Keep the history a while for people, then let it expire.
    let store = router.connections.store.as_ref();
    let history = history::read(store, &result.plan_id, &result.path).await?;
    if !history.is_empty() {
        history::write(
            store,
            &result.plan_id,
            &result.path,
            &history,
            Some(history::DONE_HISTORY_TTL),
        )
        .await?;
    }
    tracing::info!(plan_id = %result.plan_id, path = %result.path, "QA passed: task done");
    Ok(())
}

async fn qa_failed(router: &Router, task: &TaskRecord, result: &QaResult) -> Result<(), StepError> {
    let store = router.connections.store.as_ref();
    let failing: Vec<&str> = result
        .checks
        .iter()
        .filter(|c| c.status != "passed" && c.status != "skipped")
        .map(|c| c.name.as_str())
        .collect();
    let error = format!("QA failed: {}", failing.join(", "));
    let history = history::append(
        store,
        &result.plan_id,
        &result.path,
        HistoryEntry {
            attempt: result.attempt,
            stage: Stage::Qa,
            error: error.clone(),
            diagnostics: Some(result.diagnostics.clone()),
            at_ms: now_ms(),
        },
    )
    .await?;
    let failures = history.len() as u32;
    if failures >= router.max_failures {
        let reason = format!("gave up after {failures} failures; the last: {error}");
        return dead_letter(router, task, &history, &reason).await;
    }
    // Fenced by the verdict's attempt: a verdict on an attempt that is over
    // changes nothing.
    if let Err(e) = store
        .requeue(
            &result.plan_id,
            &result.path,
            &Fence::attempt(result.attempt),
            TaskClass::Fix,
            Some(result.diagnostics.clone()),
        )
        .await
    {
        if e.is_stale() {
            tracing::info!(error = %e, "stale QA verdict: the task moved on");
            return Ok(());
        }
        return Err(e.into());
    }
    router
        .metrics
        .emit(TaskFixing {
            plan_id: result.plan_id.clone(),
            path: result.path.clone(),
            attempt: result.attempt,
            failures,
        })
        .await;
    tracing::info!(failures, "QA failed: fix task queued (priority high)");
    Ok(())
}

/// `task.failed` → a delayed retry, or a dead letter.
#[tracing::instrument(skip_all, fields(plan_id = tracing::field::Empty, path = tracing::field::Empty, attempt = tracing::field::Empty))]
pub(crate) async fn handle_failed(router: Arc<Router>, envelope: Envelope) -> Settlement {
    let Message::TaskFailed(failed) = envelope.message else {
        return consume::unexpected(&envelope, queues::TASK_FAILED);
    };
    record_fields(&failed.plan_id, &failed.path, failed.attempt);
    if failed.stage == Stage::Integration {
        tracing::warn!("integration failures are the scheduler's; ignoring");
        return Settlement::Ack;
    }
    let task = match load(&router, &failed.plan_id, &failed.path).await {
        Ok(t) => t,
        Err(s) => return s,
    };
    if task.state.is_final() || task.attempt != failed.attempt {
        if let Some(settlement) = report_again_if_dead(&router, &task, failed.attempt).await {
            return settlement;
        }
        tracing::info!(
            state = task.state.as_str(),
            current_attempt = task.attempt,
            "stale task.failed: the task moved on"
        );
        return Settlement::Ack;
    }
    // A non-retryable failure is the plan's (a bad spec), not the stage's:
    // it must not open the fleet-wide breaker.
    if failed.retryable {
        let attempt = attempt_of(&failed.plan_id, &failed.path, failed.attempt);
        if let Err(e) = router.breakers.record(failed.stage, attempt, false).await {
            tracing::warn!(error = %e, "cannot record a failure in the breaker");
        }
    }
    match route_failure(&router, &task, &failed).await {
        Ok(()) => Settlement::Ack,
        Err(e) => e.settlement("routing the failure"),
    }
}

async fn route_failure(
    router: &Router,
    task: &TaskRecord,
    failed: &TaskFailed,
) -> Result<(), StepError> {
    let store = router.connections.store.as_ref();
    let history = history::append(
        store,
        &failed.plan_id,
        &failed.path,
        HistoryEntry {
            attempt: failed.attempt,
            stage: failed.stage,
            error: first_line(&failed.error),
            diagnostics: Some(failed.error.clone()),
            at_ms: now_ms(),
        },
    )
    .await?;
    let failures = history.len() as u32;
    if !failed.retryable {
        let reason = format!(
            "not retryable ({} attempt {}): {}",
            failed.stage.as_str(),
            failed.attempt,
            first_line(&failed.error)
        );
        return dead_letter(router, task, &history, &reason).await;
    }
    if failures >= router.max_failures {
        let reason = format!(
            "gave up after {failures} failures; the last ({} attempt {}): {}",
            failed.stage.as_str(),
            failed.attempt,
            first_line(&failed.error)
        );
        return dead_letter(router, task, &history, &reason).await;
    }
    let delay = retry::schedule(router, failed, task, failures).await?;
    router
        .metrics
        .emit(TaskRetrying {
            plan_id: failed.plan_id.clone(),
            path: failed.path.clone(),
            stage: failed.stage,
            attempt: failed.attempt,
            failures,
            delay_ms: delay.as_millis() as u64,
        })
        .await;
    tracing::info!(
        failures,
        delay_ms = delay.as_millis() as u64,
        "attempt failed: retry scheduled"
    );
    Ok(())
}

fn first_line(s: &str) -> String {
    devfleet_protocol::trim_text(s.lines().next().unwrap_or(""), 500)
}

/// Gives up on a task: Failed in the store (dependents Blocked), indexed in
/// the DLQ with its history, escalated to the planner, and reported to the
/// scheduler (`task.finally_failed`), which decides the plan. Idempotent.
async fn dead_letter(
    router: &Router,
    task: &TaskRecord,
    history: &[HistoryEntry],
    reason: &str,
) -> Result<(), StepError> {
    let store = router.connections.store.as_ref();
    let entry = DlqEntry {
        id: dlq::task_entry_id(&task.plan_id, &task.path, task.attempt),
        source: DlqSource::Task,
        plan_id: Some(task.plan_id.clone()),
        path: Some(task.path.clone()),
        reason: reason.to_owned(),
        at_ms: now_ms(),
        history: history.to_vec(),
        queue: None,
        attempts: history.len() as u32,
        kind: None,
        payload: None,
        payload_bytes: 0,
    };
    // Index first: a task Failed without its entry would be invisible to
    // `devfleet dlq list`; an entry for a task that then failed to fail is
    // rewritten by the redelivery.
    dlq::put(store, &entry).await?;
    let failure = match store
        .fail(
            &task.plan_id,
            &task.path,
            &Fence::attempt(task.attempt),
            reason,
        )
        .await
    {
        Ok(f) => f,
        Err(e) if e.is_stale() => {
            // The attempt ended otherwise between reading the task and
            // failing it: its entry is not a dead letter.
            tracing::info!(error = %e, "stale failure: the task moved on");
            store.kv_delete(dlq::DLQ, &entry.id).await?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    store
        .kv_delete(retry::RETRIES, &task_key(&task.plan_id, &task.path))
        .await?;
    if failure.newly_failed {
        tracing::warn!(
            dlq_id = %entry.id,
            blocked = failure.blocked.len(),
            %reason,
            "task dead-lettered"
        );
        router
            .connections
            .event(Escalation {
                plan_id: task.plan_id.clone(),
                path: Some(task.path.clone()),
                reason: format!("{reason} (dead letter {})", entry.id),
                history: history.iter().map(HistoryEntry::to_record).collect(),
            })
            .await;
        router
            .metrics
            .emit(metrics::TaskDeadLettered {
                plan_id: task.plan_id.clone(),
                path: task.path.clone(),
                error: reason.to_string(),
                dlq_id: entry.id.clone(),
                blocked: failure.blocked.clone(),
            })
            .await;
    }
    // The scheduler alone ends plans: it learns of the failure from this
    // report (sent again by a redelivery, which it ignores as a repeat).
    report_dead(router, task, reason).await
}

/// Reports a dead-lettered task to the scheduler (`task.finally_failed`).
async fn report_dead(router: &Router, task: &TaskRecord, reason: &str) -> Result<(), StepError> {
    router
        .connections
        .publish(
            queues::TASK_FINALLY_FAILED,
            TaskFinallyFailed {
                plan_id: task.plan_id.clone(),
                path: task.path.clone(),
                attempt: task.attempt,
                reason: reason.to_owned(),
                dlq_id: Some(dlq::task_entry_id(&task.plan_id, &task.path, task.attempt)),
            },
        )
        .await
        .map_err(StepError::Publish)
}

/// For a message about an attempt that was dead-lettered already: reports
/// the failure again, in case the delivery that dead-lettered it stopped
/// before its report went out. `None` when the task is not dead at that
/// attempt (the message is simply stale).
async fn report_again_if_dead(
    router: &Router,
    task: &TaskRecord,
    attempt: u32,
) -> Option<Settlement> {
    if task.state != TaskState::Failed || task.attempt != attempt {
        return None;
    }
    let reason = task.error.as_deref().unwrap_or("dead-lettered");
    Some(match report_dead(router, task, reason).await {
        Ok(()) => Settlement::Ack,
        Err(e) => e.settlement("reporting the dead-lettered task"),
    })
}

/// The periodic part: breaker timers, parked QA work, health reports.
pub(crate) async fn tick(
    router: Arc<Router>,
    period: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut last_health: Option<Instant> = None;
    loop {
        match router.breakers.tick().await {
            Ok(states) => {
                if last_health.is_none_or(|t| t.elapsed() >= HEALTH_EVERY) {
                    last_health = Some(Instant::now());
                    for s in &states {
                        router.breakers.emit_health(s).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "breaker tick failed"),
        }
        if let Err(e) = release_parked(&router).await {
            tracing::warn!(error = %e, "releasing parked QA work failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// Publishes parked QA work while the QA breaker admits it.
///
/// A parked record is deleted only after its work was published and
/// confirmed, and only if it still holds what was published
/// (`kv_delete_if`: a newer parking of the task survives). A router that
/// stops between the publish and the delete leaves the record, so the next
/// tick publishes it again: QA may run twice (a verdict for the same
/// attempt and artifact counts once), but the work is never lost. Replicas
/// may both publish one record for the same reason.
async fn release_parked(router: &Router) -> anyhow::Result<()> {
    let store = router.connections.store.as_ref();
    let parked = store.kv_list(QA_PARKED).await?;
    for (key, json) in parked {
        let Ok(work) = serde_json::from_str::<QaWork>(&json) else {
            tracing::warn!(%key, "dropping an unreadable parked QA record");
            store.kv_delete_if(QA_PARKED, &key, &json).await?;
            continue;
        };
        let attempt = attempt_of(&work.plan_id, &work.path, work.attempt);
        if !router.breakers.admit(Stage::Qa, attempt).await? {
            break;
        }
        let current = store.task(&work.plan_id, &work.path).await?;
        if current.is_some_and(|t| {
            t.state == TaskState::Built && t.artifact.as_deref() == Some(work.artifact.as_str())
        }) {
            router.connections.publish(queues::WORK_QA, work).await?;
        }
        store.kv_delete_if(QA_PARKED, &key, &json).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{BreakerSettings, Breakers, Counts};
    use devfleet_protocol::PlanStatus;
    use devfleet_runtime::Connections;
    use devfleet_store::{ClaimOutcome, NewTask, PlanRecord};

    fn router(c: &Connections) -> Arc<Router> {
        Arc::new(Router {
            metrics: c.metrics("r1"),
            connections: c.clone(),
            backoff: Config::new(c.clone()).backoff,
            max_failures: 3,
            retry_lease_grace: Duration::from_secs(60),
            breakers: Breakers::new(c.clone(), "r1".into(), BreakerSettings::default()),
        })
    }

    /// A plan of independent tasks, each claimed by `w1` (attempt 1).
    async fn claimed(c: &Connections, paths: &[&str]) -> Vec<TaskRecord> {
        let tasks = paths
            .iter()
            .map(|p| NewTask {
                path: (*p).into(),
                spec: format!("write {p}"),
                content: None,
                depends_on: vec![],
                priority: 0,
                estimate: 1,
                executor: None,
            })
            .collect();
        let plan = PlanRecord::new("p-breaker", "t", PlanStatus::Running, 0);
        assert!(c.store.create_plan(plan, tasks).await.unwrap());
        let mut out = Vec::new();
        for p in paths {
            match c
                .store
                .claim("p-breaker", p, "w1", None, Duration::from_secs(60))
                .await
                .unwrap()
            {
                ClaimOutcome::Claimed(t) => out.push(t),
                other => panic!("claiming {p}: {other:?}"),
            }
        }
        out
    }

    fn built(
        t: &TaskRecord,
        attempt: u32,
        artifact: &str,
        cache_hit: bool,
        again: bool,
    ) -> Envelope {
        Envelope::new(TaskBuilt {
            plan_id: t.plan_id.clone(),
            path: t.path.clone(),
            attempt,
            artifact: artifact.into(),
            cache_hit,
            executor: "builtin".into(),
            duration_ms: 1,
            reannounced: again,
        })
    }

    fn failed(t: &TaskRecord, attempt: u32, retryable: bool) -> Envelope {
        Envelope::new(TaskFailed {
            plan_id: t.plan_id.clone(),
            path: t.path.clone(),
            attempt,
            stage: Stage::Dev,
            error: "the executor failed".into(),
            retryable,
        })
    }

    async fn dev_window(r: &Router) -> Counts {
        r.breakers.window(Stage::Dev, 0).await.unwrap()
    }

    #[tokio::test]
    async fn only_current_executor_runs_count_as_dev_successes() {
        let c = Connections::in_memory();
        let r = router(&c);
        let t = claimed(&c, &["a.py"]).await.remove(0);
        c.store
            .mark_built(&t.plan_id, &t.path, &Fence::of(&t), "h1")
            .await
            .unwrap();
        // A cache hit and a re-announcement ran no executor; a build of an
        // older attempt is stale.
        for envelope in [
            built(&t, 1, "h1", true, false),
            built(&t, 1, "h1", false, true),
            built(&t, 0, "h0", false, false),
        ] {
            assert_eq!(handle_built(r.clone(), envelope).await, Settlement::Ack);
        }
        assert_eq!(dev_window(&r).await, Counts::default());
        let run = built(&t, 1, "h1", false, false);
        assert_eq!(handle_built(r.clone(), run).await, Settlement::Ack);
        assert_eq!(dev_window(&r).await, Counts { ok: 1, err: 0 });
    }

    #[tokio::test]
    async fn bad_specs_and_stale_failures_do_not_count_as_dev_errors() {
        let c = Connections::in_memory();
        let r = router(&c);
        let tasks = claimed(&c, &["bad.py", "old.py", "flaky.py"]).await;
        // A plan's non-retryable error (a bad spec) is the plan's fault.
        assert_eq!(
            handle_failed(r.clone(), failed(&tasks[0], 1, false)).await,
            Settlement::Ack
        );
        assert_eq!(
            c.store
                .task("p-breaker", "bad.py")
                .await
                .unwrap()
                .unwrap()
                .state,
            TaskState::Failed,
            "dead-lettered all the same"
        );
        // A failure of an attempt that is over.
        assert_eq!(
            handle_failed(r.clone(), failed(&tasks[1], 7, true)).await,
            Settlement::Ack
        );
        assert_eq!(dev_window(&r).await, Counts::default());
        // The control: a retryable failure of the current attempt counts.
        assert_eq!(
            handle_failed(r.clone(), failed(&tasks[2], 1, true)).await,
            Settlement::Ack
        );
        assert_eq!(dev_window(&r).await, Counts { ok: 0, err: 1 });
    }

    fn plain_router(connections: Connections) -> Router {
        let config = Config::new(connections.clone());
        Router {
            metrics: connections.metrics("router-test"),
            breakers: crate::breaker::Breakers::new(
                connections.clone(),
                "router-test".into(),
                config.breaker.clone(),
            ),
            connections,
            backoff: config.backoff,
            max_failures: config.max_failures,
            retry_lease_grace: config.retry_lease_grace,
        }
    }

    /// A one-task plan whose task is Built with artifact `h`, and its QA
    /// work parked; returns the parked record.
    async fn parked_built_task(connections: &Connections) -> (String, String) {
        let store = &connections.store;
        let task = NewTask::new("a.py", "s");
        let plan = PlanRecord::new("p", "p", PlanStatus::Running, now_ms());
        assert!(store.create_plan(plan, vec![task]).await.unwrap());
        let claimed = store
            .claim_next("w", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        store
            .mark_built("p", "a.py", &Fence::of(&claimed), "h")
            .await
            .unwrap();
        let work = QaWork {
            plan_id: "p".into(),
            path: "a.py".into(),
            attempt: claimed.attempt,
            artifact: "h".into(),
        };
        let key = task_key("p", "a.py");
        let json = serde_json::to_string(&work).unwrap();
        store.kv_put(QA_PARKED, &key, &json, None).await.unwrap();
        (key, json)
    }

    /// A broker that never confirms a publish: it says when one started
    /// and then hangs, so a test can stop the publisher at that point as a
    /// crash would.
    struct StalledBus {
        inner: devfleet_bus::memory::MemoryBus,
        started: Arc<tokio::sync::Notify>,
    }

    #[async_trait::async_trait]
    impl devfleet_bus::Bus for StalledBus {
        fn backend(&self) -> &'static str {
            "stalled"
        }
        async fn publish(&self, _queue: &str, _payload: &[u8]) -> devfleet_bus::BusResult<()> {
            self.started.notify_one();
            std::future::pending().await
        }
        async fn consume(
            &self,
            queue: &str,
            options: ConsumeOptions,
        ) -> devfleet_bus::BusResult<devfleet_bus::Consumer> {
            self.inner.consume(queue, options).await
        }
        async fn queue_depth(&self, queue: &str) -> devfleet_bus::BusResult<u64> {
            self.inner.queue_depth(queue).await
        }
        async fn purge(&self, queue: &str) -> devfleet_bus::BusResult<u64> {
            self.inner.purge(queue).await
        }
        async fn broadcast(&self, subject: &str, payload: &[u8]) -> devfleet_bus::BusResult<()> {
            self.inner.broadcast(subject, payload).await
        }
        async fn listen(&self, pattern: &str) -> devfleet_bus::BusResult<devfleet_bus::Listener> {
            self.inner.listen(pattern).await
        }
        async fn close(&self) {
            self.inner.close().await
        }
    }

    #[tokio::test]
    async fn a_router_stopped_while_publishing_parked_qa_work_leaves_it_parked() {
        let started = Arc::new(tokio::sync::Notify::new());
        let stalled = Connections {
            bus: Arc::new(StalledBus {
                inner: devfleet_bus::memory::MemoryBus::new(),
                started: started.clone(),
            }),
            ..Connections::in_memory()
        };
        let (key, json) = parked_built_task(&stalled).await;
        let stalled_router = plain_router(stalled.clone());
        // The router stops (its future is dropped) while the publish waits
        // for the broker's confirm.
        tokio::select! {
            _ = release_parked(&stalled_router) => panic!("the publish cannot finish"),
            _ = started.notified() => {}
        }
        assert_eq!(
            stalled.store.kv_get(QA_PARKED, &key).await.unwrap(),
            Some(json),
            "the record is still there: the work was not confirmed"
        );
        released_on_the_next_tick(&stalled.store).await;
    }

    #[tokio::test]
    async fn parked_qa_work_stays_parked_until_its_publish_is_confirmed() {
        let broken = Connections::in_memory();
        let (key, json) = parked_built_task(&broken).await;
        // The broker refuses the publish: the window in which a router that
        // took the record and then stopped would have lost the work.
        broken.bus.close().await;
        assert!(release_parked(&plain_router(broken.clone())).await.is_err());
        assert_eq!(
            broken.store.kv_get(QA_PARKED, &key).await.unwrap(),
            Some(json),
            "the record is still there after a publish that failed"
        );
        released_on_the_next_tick(&broken.store).await;
    }

    /// The next tick (here: a router on a working broker with the same
    /// store) releases the parked QA work: one message, no record left.
    async fn released_on_the_next_tick(store: &devfleet_store::SharedStore) {
        let working = Connections {
            store: store.clone(),
            ..Connections::in_memory()
        };
        release_parked(&plain_router(working.clone()))
            .await
            .unwrap();
        assert_eq!(working.queue_depth(queues::WORK_QA).await.unwrap(), 1);
        assert!(working.store.kv_list(QA_PARKED).await.unwrap().is_empty());
    }
}
