//! Plan intake: `plans.analyzed` → the plan and its tasks in the store.
//!
//! The plan and every task are created in one atomic store step, and the
//! delivery is acked only after it. A redelivered plan finds the plan there
//! (`create_plan` returns false) and creates nothing twice.

use crate::Shared;
use devfleet_protocol::{
    metrics::PlanProgress, now_ms, queues, Envelope, Message, PlanAnalyzed, PlanEvent, PlanStatus,
};
use devfleet_runtime::consume::{self, Settlement};
use devfleet_store::{NewTask, PlanRecord};
use std::sync::Arc;

/// Handles one `plans.analyzed` envelope.
pub(crate) async fn handle(shared: Arc<Shared>, envelope: Envelope) -> Settlement {
    match envelope.message {
        Message::PlanAnalyzed(plan) => create(&shared, plan).await,
        _ => consume::unexpected(&envelope, queues::PLANS_ANALYZED),
    }
}

/// The store's view of an analyzed plan: one [`NewTask`] per task, with the
/// plan's default executor filled in where the task names none.
pub fn new_tasks(plan: &PlanAnalyzed) -> Vec<NewTask> {
    let default_executor = plan.plan.executor;
    plan.tasks
        .iter()
        .map(|t| NewTask {
            path: t.path.clone(),
            spec: t.spec.clone(),
            content: t.content.clone(),
            depends_on: t.depends_on.clone(),
            priority: t.priority,
            estimate: t.estimate,
            executor: t
                .executor
                .or(default_executor)
                .map(|e| e.as_str().to_owned()),
        })
        .collect()
}

async fn create(shared: &Shared, plan: PlanAnalyzed) -> Settlement {
    let tasks = new_tasks(&plan);
    let total = u32::try_from(tasks.len()).unwrap_or(u32::MAX);
    let detail = match serde_json::to_string(&plan) {
        Ok(d) => d,
        Err(e) => return Settlement::DeadLetter(format!("cannot serialise plan: {e}")),
    };
    let record = PlanRecord {
        detail,
        ..PlanRecord::new(
            &plan.plan_id,
            &plan.plan.name,
            PlanStatus::Running,
            now_ms(),
        )
    };
    let store = &shared.connections.store;
    let created = match store.create_plan(record, tasks).await {
        Ok(created) => created,
        Err(e) => {
            let settlement = Settlement::from_store_error("creating the plan", e);
            if let Settlement::DeadLetter(reason) = &settlement {
                shared
                    .connections
                    .event(devfleet_protocol::PlanRejected {
                        plan_id: plan.plan_id.clone(),
                        name: plan.plan.name.clone(),
                        error: reason.clone(),
                    })
                    .await;
            }
            return settlement;
        }
    };
    if !created {
        tracing::info!(plan_id = %plan.plan_id, "plan already in the store (redelivery); nothing to do");
        return Settlement::Ack;
    }
    tracing::info!(
        plan_id = %plan.plan_id,
        name = %plan.plan.name,
        tasks = total,
        critical_path = plan.critical_path_length,
        "plan created"
    );
    shared
        .traces
        .remember(
            store.as_ref(),
            &plan.plan_id,
            devfleet_telemetry::current_traceparent(),
        )
        .await;
    if total == 0 {
        // Nothing will ever complete to end it (the analyzer rejects empty
        // plans; this only guards against another publisher).
        if let Err(e) = crate::completion::finish_plan(shared, &plan.plan_id).await {
            return e.settlement("ending an empty plan");
        }
        return Settlement::Ack;
    }
    shared.wake.notify_one();
    shared
        .connections
        .event(PlanEvent {
            plan_id: plan.plan_id.clone(),
            name: plan.plan.name.clone(),
            status: PlanStatus::Running,
            done: 0,
            failed: 0,
            total,
            message: Some(format!(
                "{total} tasks; critical path {} long",
                plan.critical_path_length
            )),
        })
        .await;
    shared
        .metrics
        .emit(PlanProgress {
            plan_id: plan.plan_id.clone(),
            name: plan.plan.name.clone(),
            status: PlanStatus::Running,
            done: 0,
            failed: 0,
            blocked: 0,
            total,
        })
        .await;
    Settlement::Ack
}

#[cfg(test)]
mod tests {
    use super::*;
    use devfleet_protocol::{AnalyzedTask, ExecutorKind, Plan};

    #[test]
    fn tasks_inherit_the_plan_executor_unless_they_name_one() {
        let task = |path: &str, executor| AnalyzedTask {
            path: path.into(),
            spec: "s".into(),
            content: None,
            depends_on: vec![],
            estimate: 1,
            priority: 1,
            batch: 0,
            executor,
        };
        let plan = PlanAnalyzed {
            plan_id: "p1".into(),
            plan: Plan {
                name: "n".into(),
                base: None,
                executor: Some(ExecutorKind::Simulate),
                tasks: vec![],
                integration: vec![],
                deploy: None,
            },
            tasks: vec![task("a", None), task("b", Some(ExecutorKind::Builtin))],
            critical_path_length: 1,
            critical_path: vec!["a".into()],
        };
        let tasks = new_tasks(&plan);
        assert_eq!(tasks[0].executor.as_deref(), Some("simulate"));
        assert_eq!(tasks[1].executor.as_deref(), Some("builtin"));
    }
}
