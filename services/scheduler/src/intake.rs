//! Plan intake: `plans.analyzed` → the plan and its tasks in the store.
//!
//! The plan and every task are created in one atomic store step, and the
//! delivery is acked only after it. A redelivered plan finds the plan there
//! (`create_plan` returns false) and creates nothing twice.
//!
//! The analyzer checked the plan, but the bus is not the analyzer: a
//! message from any other publisher is checked again ([`check`]), so a plan
//! over the limits (e.g. an integration step of 4294967295 shards) is
//! recorded as rejected, and nothing of it is created or allocated.

use crate::Shared;
use devfleet_protocol::{
    metrics::PlanProgress, now_ms, queues, Envelope, Message, PlanAnalyzed, PlanEvent, PlanStatus,
};
use devfleet_runtime::consume::{self, Settlement};
use devfleet_store::{nano_usd, BudgetLimits, NewTask, PlanRecord};
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

/// Checks an analyzed plan against the limits of the plan format that size
/// the scheduler's work: the number of tasks, and each integration step
/// (count, shards, timeout), each error naming the field and the limit.
/// (The analyzer ran [`devfleet_protocol::Plan::validate`] on the whole
/// plan; the tasks that count here are the analyzed ones, which become
/// the store's.)
pub fn check(plan: &PlanAnalyzed) -> Result<(), String> {
    use devfleet_protocol::plan::{MAX_INTEGRATION_STEPS, MAX_TASKS};
    use devfleet_protocol::PlanError;
    if plan.tasks.len() > MAX_TASKS {
        return Err(PlanError::TooManyTasks {
            count: plan.tasks.len(),
            limit: MAX_TASKS,
        }
        .to_string());
    }
    if let Some(budget) = &plan.plan.budget {
        budget
            .validate()
            .map_err(|e| PlanError::InvalidBudget(e).to_string())?;
    }
    let steps = &plan.plan.integration;
    if steps.len() > MAX_INTEGRATION_STEPS {
        return Err(PlanError::TooManyIntegrationSteps {
            count: steps.len(),
            limit: MAX_INTEGRATION_STEPS,
        }
        .to_string());
    }
    for step in steps {
        step.validate().map_err(|reason| {
            PlanError::InvalidIntegration {
                step: step.name.clone(),
                reason,
            }
            .to_string()
        })?;
    }
    Ok(())
}

/// Records `plan` as rejected with `error` (created without tasks) and
/// announces it.
async fn reject(shared: &Shared, plan: &PlanAnalyzed, error: String) -> Settlement {
    tracing::warn!(plan_id = %plan.plan_id, %error, "analyzed plan refused");
    let record = PlanRecord {
        message: Some(error.clone()),
        ..PlanRecord::new(
            &plan.plan_id,
            &plan.plan.name,
            PlanStatus::Rejected,
            now_ms(),
        )
    };
    if let Err(e) = shared
        .connections
        .store
        .create_plan(record, Vec::new())
        .await
    {
        return Settlement::from_store_error("recording the rejected plan", e);
    }
    shared
        .connections
        .event(devfleet_protocol::PlanRejected {
            plan_id: plan.plan_id.clone(),
            name: plan.plan.name.clone(),
            error,
        })
        .await;
    Settlement::Ack
}

async fn create(shared: &Shared, plan: PlanAnalyzed) -> Settlement {
    if let Err(error) = check(&plan) {
        return reject(shared, &plan, error).await;
    }
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
    // The plan's own budget, before any of its tasks can run; not over a
    // budget set since (a redelivered plan after `devfleet budget`).
    if let Some(budget) = plan.plan.budget {
        let limits = BudgetLimits {
            max_tokens: budget.max_tokens,
            max_cost_nusd: budget.max_cost_usd.map(nano_usd),
        };
        let set = async {
            if store.budget(&plan.plan_id).await?.limits.is_none() {
                store.set_budget(&plan.plan_id, limits).await?;
            }
            Ok::<_, devfleet_store::StoreError>(())
        };
        if let Err(e) = set.await {
            return Settlement::from_store_error("setting the plan's budget", e);
        }
    }
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
    use devfleet_protocol::{ExecutorKind, Plan};

    #[test]
    fn tasks_inherit_the_plan_executor_unless_they_name_one() {
        let task = crate::test_plans::task;
        let plan = PlanAnalyzed {
            plan_id: "p1".into(),
            plan: Plan {
                requires: Vec::new(),
                name: "n".into(),
                base: None,
                base_snapshot: None,
                executor: Some(ExecutorKind::Simulate),
                tasks: vec![],
                integration: vec![],
                deploy: None,
                budget: None,
            },
            tasks: vec![
                task("a", None, None),
                task("b", None, Some(ExecutorKind::Builtin)),
            ],
            critical_path_length: 1,
            critical_path: vec!["a".into()],
        };
        let tasks = new_tasks(&plan);
        assert_eq!(tasks[0].executor.as_deref(), Some("simulate"));
        assert_eq!(tasks[1].executor.as_deref(), Some("builtin"));
    }

    /// An analyzed plan no analyzer would have let through: one task, and
    /// an integration step of `u32::MAX` shards.
    fn hostile() -> PlanAnalyzed {
        let mut analyzed = crate::test_plans::one_task(
            &devfleet_testkit::unique("hostile"),
            "a.py",
            None,
            "integration:\n  - { name: unit, run: pytest }\n",
        );
        analyzed.plan.integration[0].shard = Some(u32::MAX);
        analyzed
    }

    #[tokio::test]
    async fn a_plan_over_the_limits_from_another_publisher_is_rejected_not_created() {
        let connections = devfleet_runtime::Connections::in_memory();
        let shared = Shared::for_tests(connections.clone());
        let plan = hostile();
        let envelope = Envelope::new(Message::PlanAnalyzed(plan.clone()));
        assert!(matches!(handle(shared, envelope).await, Settlement::Ack));
        let record = connections
            .store
            .plan(&plan.plan_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.status, PlanStatus::Rejected);
        let message = record.message.unwrap_or_default();
        assert!(message.contains("shard is 4294967295"), "{message}");
        assert!(connections
            .store
            .tasks(&plan.plan_id)
            .await
            .unwrap()
            .is_empty());
    }
}
