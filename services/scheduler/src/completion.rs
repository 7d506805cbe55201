//! Task completion and failure, and the end of a plan's tasks.
//!
//! `handle_done` consumes `task.done` (published by the router once a task
//! passed every stage). Completing is idempotent in the store: the step that
//! makes a task Done also makes Ready each dependent whose last unfinished
//! dependency it was, and a duplicate delivery changes nothing. When the
//! last task of a plan becomes final, [`finish_plan`] moves the plan on:
//! Failed if a task failed; else to its integration stage
//! ([`crate::integration`]), its deploy stage ([`crate::deploy`]) or
//! Succeeded. The direct seam ([`crate::direct_router`]) uses the same
//! functions.

use crate::stages::PlanStages;
use crate::{deploy, integration, Shared, TASKS_COMPLETED};
use devfleet_protocol::metrics::{PlanProgress, TaskCompleted, TaskFailure};
use devfleet_protocol::{queues, Envelope, Message, PlanEvent, PlanStatus};
use devfleet_runtime::consume::{self, Settlement, StepError};
use devfleet_store::{PlanRecord, TaskState, TaskStore};
use std::sync::Arc;

/// Longest plan status message, in characters.
pub(crate) const MAX_MESSAGE_CHARS: usize = 2_000;

/// Handles one `task.done` envelope.
pub(crate) async fn handle_done(shared: Arc<Shared>, envelope: Envelope) -> Settlement {
    match envelope.message {
        Message::TaskDone(done) => {
            match complete(&shared, &done.plan_id, &done.path, &done.artifact).await {
                Ok(()) => Settlement::Ack,
                Err(e) => e.settlement("completing the task"),
            }
        }
        _ => consume::unexpected(&envelope, queues::TASK_DONE),
    }
}

/// Completes a task with its artifact, releases its dependents (they become
/// Ready in the same store step) and finishes the plan when it was the last.
/// Idempotent: a task already Done changes nothing, but a finished plan is
/// still finalised, in case an earlier delivery stopped half-way.
pub(crate) async fn complete(
    shared: &Shared,
    plan_id: &str,
    path: &str,
    artifact: &str,
) -> Result<(), StepError> {
    let store = &shared.connections.store;
    let completion = store.complete(plan_id, path, artifact).await?;
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
/// is already Done or Blocked is left alone (the failure is stale).
pub(crate) async fn fail(
    shared: &Shared,
    plan_id: &str,
    path: &str,
    error: &str,
) -> Result<(), StepError> {
    let store = &shared.connections.store;
    let failure = store.fail(plan_id, path, error).await?;
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
            shared
                .connections
                .event(PlanEvent {
                    plan_id: plan_id.to_owned(),
                    name: plan.name.clone(),
                    status: plan.status,
                    done: plan.done,
                    failed: plan.failed,
                    total: plan.total,
                    message: Some(truncate(format!(
                        "{path} failed: {error}; {} dependent(s) blocked",
                        failure.blocked.len()
                    ))),
                })
                .await;
        }
    }
    if failure.plan_finished {
        finish_plan(shared, plan_id).await?;
    }
    Ok(())
}

/// The message of a plan that failed because some tasks did.
async fn failed_tasks_message(
    store: &dyn TaskStore,
    plan: &PlanRecord,
) -> Result<String, StepError> {
    let tasks = store.tasks(&plan.id).await?;
    let failed: Vec<String> = tasks
        .iter()
        .filter(|t| t.state == TaskState::Failed)
        .map(|t| {
            format!(
                "{} ({})",
                t.path,
                t.error.as_deref().unwrap_or("no error recorded")
            )
        })
        .collect();
    Ok(truncate(format!(
        "{} task(s) failed: {}; {} blocked; {} of {} done",
        failed.len(),
        failed.join(", "),
        plan.blocked,
        plan.done,
        plan.total
    )))
}

/// Moves on a plan whose every task is final: Failed (naming the failed
/// tasks) when any failed or is blocked; otherwise into its integration
/// stage, or its deploy stage, or Succeeded.
///
/// Safe to call any number of times, concurrently too: a plan that already
/// ended is left alone, and entering a stage is claimed once in the store
/// ([`crate::stages`]); a repeated call only finishes what an interrupted
/// one left undone (at worst a best-effort event goes out twice).
pub(crate) async fn finish_plan(shared: &Shared, plan_id: &str) -> Result<(), StepError> {
    let store = &shared.connections.store;
    let Some(plan) = store.plan(plan_id).await? else {
        return Ok(());
    };
    if plan.status.is_final() {
        return Ok(());
    }
    if plan.failed > 0 || plan.blocked > 0 {
        let message = failed_tasks_message(store.as_ref(), &plan).await?;
        return end_plan(shared, &plan, PlanStatus::Failed, Some(message)).await;
    }
    let stages = match PlanStages::of(&plan) {
        Ok(stages) => stages,
        Err(message) => {
            tracing::error!(plan_id, %message, "cannot read the plan's later stages");
            return end_plan(shared, &plan, PlanStatus::Failed, Some(truncate(message))).await;
        }
    };
    match (&plan.status, &stages.deploy) {
        // Past integration: only make sure the deploy request went out.
        (PlanStatus::Deploying, Some(spec)) => deploy::request(shared, &plan, spec).await,
        (PlanStatus::Deploying, None) => Ok(()),
        _ if !stages.integration.is_empty() => integration::start(shared, &plan, &stages).await,
        (_, Some(spec)) => deploy::request(shared, &plan, spec).await,
        (_, None) => end_plan(shared, &plan, PlanStatus::Succeeded, None).await,
    }
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

/// Announces a plan's status: `plan.event` and a `task_progress` metric
/// (best effort).
pub(crate) async fn announce(
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

/// Cuts a plan message to [`MAX_MESSAGE_CHARS`] characters.
pub(crate) fn truncate(mut s: String) -> String {
    if s.chars().count() > MAX_MESSAGE_CHARS {
        s = s.chars().take(MAX_MESSAGE_CHARS).collect::<String>() + "…";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut() {
        let s = truncate("x".repeat(5_000));
        assert_eq!(s.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert_eq!(truncate("short".into()), "short");
    }
}
