//! Task completion and failure, and the end of a plan's tasks.
//!
//! `handle_done` consumes `task.done` (published by the router once a task
//! passed every stage). Completing is idempotent in the store: the step that
//! makes a task Done also makes Ready each dependent whose last unfinished
//! dependency it was, and a duplicate delivery changes nothing.
//! `handle_finally_failed` consumes `task.finally_failed` (the router gave up
//! on a task). When the last task of a plan becomes final, [`finish_plan`]
//! steps the plan's lifecycle ([`crate::lifecycle`]): Failed if a task
//! failed; else its integration stage, its deploy stage or Succeeded. The
//! direct seam ([`crate::direct_router`]) uses the same functions.

use crate::lifecycle::Event;
use crate::{effects, Shared, TASKS_COMPLETED};
use devfleet_protocol::metrics::{PlanProgress, TaskCompleted, TaskFailure};
use devfleet_protocol::{queues, Envelope, Message, PlanEvent, PlanStatus};
use devfleet_runtime::consume::{self, Settlement, StepError};
use devfleet_store::{Fence, PlanRecord};
use std::sync::Arc;

/// Handles one `task.done` envelope.
pub(crate) async fn handle_done(shared: Arc<Shared>, envelope: Envelope) -> Settlement {
    match envelope.message {
        Message::TaskDone(done) => {
            match complete(
                &shared,
                &done.plan_id,
                &done.path,
                done.attempt,
                &done.artifact,
            )
            .await
            {
                Ok(()) => Settlement::Ack,
                Err(e) => e.settlement("completing the task"),
            }
        }
        _ => consume::unexpected(&envelope, queues::TASK_DONE),
    }
}

/// Handles one `task.finally_failed` envelope: the router gave up on a task
/// (and already recorded it Failed). Failing it again here changes nothing
/// in the store, but ends the plan when that was its last unfinished task:
/// the scheduler alone ends plans.
pub(crate) async fn handle_finally_failed(shared: Arc<Shared>, envelope: Envelope) -> Settlement {
    match envelope.message {
        Message::TaskFinallyFailed(dead) => {
            match fail(
                &shared,
                &dead.plan_id,
                &dead.path,
                dead.attempt,
                &dead.reason,
            )
            .await
            {
                Ok(()) => Settlement::Ack,
                Err(e) => e.settlement("ending the plan of a dead-lettered task"),
            }
        }
        _ => consume::unexpected(&envelope, queues::TASK_FINALLY_FAILED),
    }
}

/// Completes a task with its artifact, releases its dependents (they become
/// Ready in the same store step) and finishes the plan when it was the last.
/// Idempotent: a task already Done changes nothing, but a finished plan is
/// still finalised, in case an earlier delivery stopped half-way. Fenced by
/// `attempt`: a `task.done` for an attempt that is over (the task was
/// retried, fixed or taken over since) is logged and ignored, not counted.
pub(crate) async fn complete(
    shared: &Shared,
    plan_id: &str,
    path: &str,
    attempt: u32,
    artifact: &str,
) -> Result<(), StepError> {
    let store = &shared.connections.store;
    let completion = match store
        .complete(plan_id, path, &Fence::attempt(attempt), artifact)
        .await
    {
        Ok(c) => c,
        Err(e) if e.is_stale() => {
            tracing::info!(plan_id, path, attempt, error = %e, "stale task.done ignored");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    if completion.newly_done {
        // Counting is informational: a failure here must not redeliver a
        // completion that already happened.
        if let Err(e) = store.incr(TASKS_COMPLETED, 1).await {
            tracing::warn!(error = %e, "cannot count the completion");
        }
        tracing::debug!(
            plan_id,
            path,
            released = completion.released.len(),
            done = completion.done,
            total = completion.total,
            "task done"
        );
        shared
            .metrics
            .emit(TaskCompleted {
                plan_id: plan_id.to_owned(),
                path: path.to_owned(),
                status: PlanStatus::Running,
                done: completion.done,
                total: completion.total,
                released: completion.released.len() as u64,
            })
            .await;
    }
    // A completion frees a worker slot and may have released tasks.
    shared.wake.notify_one();
    if completion.plan_finished {
        finish_plan(shared, plan_id).await?;
    }
    Ok(())
}

/// Fails a task for good: its transitive dependents become Blocked with the
/// cause; tasks that do not depend on it still run. Idempotent. A task that
/// is already Done or Blocked is left alone (the failure is stale), and so
/// is a failure of an attempt that is over (fenced by `attempt`).
pub(crate) async fn fail(
    shared: &Shared,
    plan_id: &str,
    path: &str,
    attempt: u32,
    error: &str,
) -> Result<(), StepError> {
    let store = &shared.connections.store;
    let failure = match store
        .fail(plan_id, path, &Fence::attempt(attempt), error)
        .await
    {
        Ok(f) => f,
        Err(e) if e.is_stale() => {
            tracing::info!(plan_id, path, attempt, error = %e, "stale task failure ignored");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    if failure.newly_failed {
        tracing::warn!(plan_id, path, %error, blocked = failure.blocked.len(), "task failed");
        shared
            .metrics
            .emit(TaskFailure {
                plan_id: plan_id.to_owned(),
                path: path.to_owned(),
                error: error.to_string(),
                blocked: failure.blocked.clone(),
            })
            .await;
        if let Some(plan) = store.plan(plan_id).await? {
            let event = Event::TaskFailed {
                path: path.to_owned(),
                error: error.to_owned(),
                blocked: failure.blocked.len(),
            };
            effects::advance(shared, plan, event).await?;
        }
    }
    if failure.plan_finished {
        finish_plan(shared, plan_id).await?;
    }
    Ok(())
}

/// Moves on a plan whose every task is final: steps its lifecycle with
/// [`Event::TasksFinished`] (Failed naming the failed tasks when any failed
/// or is blocked; otherwise its integration stage, its deploy stage or
/// Succeeded; see [`crate::lifecycle`]).
///
/// Safe to call any number of times, concurrently too: a plan that already
/// ended is left alone, and entering a stage is claimed once in the store
/// ([`crate::stages`]); a repeated call only finishes what an interrupted
/// one left undone (at worst a best-effort event goes out twice).
pub(crate) async fn finish_plan(shared: &Shared, plan_id: &str) -> Result<(), StepError> {
    let Some(plan) = shared.connections.store.plan(plan_id).await? else {
        return Ok(());
    };
    if plan.status.is_final() {
        return Ok(());
    }
    let tasks = effects::finished_tasks(shared, &plan).await?;
    effects::advance(shared, plan, Event::TasksFinished(tasks)).await
}

/// Sets a plan's final (or next) status and announces it: log, `plan.event`
/// and a `task_progress` metric. Counts are the record's.
pub(crate) async fn end_plan(
    shared: &Shared,
    plan: &PlanRecord,
    status: PlanStatus,
    message: Option<String>,
) -> Result<(), StepError> {
    shared
        .connections
        .store
        .set_plan_status(&plan.id, status, message.clone())
        .await?;
    tracing::info!(
        plan_id = %plan.id,
        status = status.as_str(),
        done = plan.done,
        failed = plan.failed,
        blocked = plan.blocked,
        total = plan.total,
        "plan {}",
        if status.is_final() { "finished" } else { "moved on" }
    );
    announce(shared, plan, status, message).await;
    Ok(())
}

/// Announces a plan's status: `plan.event` (best effort).
pub(crate) async fn announce_status(
    shared: &Shared,
    plan: &PlanRecord,
    status: PlanStatus,
    message: Option<String>,
) {
    shared
        .connections
        .event(PlanEvent {
            plan_id: plan.id.clone(),
            name: plan.name.clone(),
            status,
            done: plan.done,
            failed: plan.failed,
            total: plan.total,
            message,
        })
        .await;
}

/// Announces a plan's status: `plan.event` and a `task_progress` metric
/// (best effort).
pub(crate) async fn announce(
    shared: &Shared,
    plan: &PlanRecord,
    status: PlanStatus,
    message: Option<String>,
) {
    announce_status(shared, plan, status, message).await;
    shared
        .metrics
        .emit(PlanProgress {
            plan_id: plan.id.clone(),
            name: plan.name.clone(),
            status,
            done: plan.done,
            failed: plan.failed,
            blocked: plan.blocked,
            total: plan.total,
        })
        .await;
}
