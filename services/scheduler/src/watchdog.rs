//! The watchdog: finds work stranded in an intermediate state and
//! announces it again.
//!
//! Every step of the pipeline writes the store first and then publishes
//! the message that moves the work on. A process that stops between the
//! two (a crash, a kill, a lost broker connection that was never retried)
//! leaves the store saying the work moved on while no message carries it.
//! The lease reaper covers tasks held by a lease (a dev-worker's, or the
//! router's hold on a task waiting for its retry); the watchdog covers the
//! states nothing holds a lease on:
//!
//! | stranded | how it is announced again |
//! |---|---|
//! | a task Built (its `task.built` lost, or the `work.qa` the router made of it, or a parked QA record or a QA retry record that vanished) | `task.built` again, with [`REANNOUNCED_EXECUTOR`](devfleet_protocol::REANNOUNCED_EXECUTOR): the router checks it is the current build and dispatches QA (or parks it) |
//! | a Running plan whose every task is final (the step that ends it never ran) | the lifecycle's `TasksFinished` step ([`crate::completion::finish_plan`]) |
//! | an Integrating plan with shards that never reported | `work.integration` for each shard without a result, then the tally ([`crate::effects::advance_with_tally`]) |
//! | a Deploying plan whose `deploy.requested` was never confirmed | the request ([`crate::deploy::request`]) |
//!
//! "Stranded" means: nothing about it changed for the stall threshold
//! (`DEVFLEET_SCHEDULER_WATCHDOG_STALL_SECONDS`, from the task's or plan's
//! `updated_ms`, the store's record of its last step), and the watchdog did
//! not announce it within that time either (a TTL'd record in the store
//! collection [`WATCHDOG`]). The threshold must exceed the longest QA run
//! of a task (checks and QA retries) and the longest integration shard;
//! work that is merely slow is then announced twice at worst, which every
//! consumer tolerates: the store transitions are idempotent, a stale
//! `task.built` or QA verdict is ignored, and the first integration result
//! of a shard is the one that counts.
//!
//! Each re-announcement is logged (warn), counted in the store counter
//! [`REANNOUNCED`] and returned by [`sweep`]. Any replica may sweep.

use crate::completion::finish_plan;
use crate::stages::{Marker, PlanStages};
use crate::{deploy, effects, integration, Shared};
use devfleet_protocol::{now_ms, queues, PlanStatus, TaskBuilt, REANNOUNCED_EXECUTOR};
use devfleet_runtime::consume::StepError;
use devfleet_store::{PlanRecord, TaskState};
use std::collections::HashSet;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Store collection of the watchdog's recent announcements (TTL'd records,
/// so a stranded item is announced at most once per stall threshold).
pub const WATCHDOG: &str = "watchdog";
/// Store counter of re-announcements.
pub const REANNOUNCED: &str = "scheduler.watchdog_reannounced";

/// What one sweep announced again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reannounced {
    /// `(plan_id, path)` of Built tasks whose `task.built` went out again.
    pub built: Vec<(String, String)>,
    /// Running plans whose end was stepped again.
    pub finished: Vec<String>,
    /// `(plan_id, shards)`: integration shards published again.
    pub integration: Vec<(String, usize)>,
    /// Deploying plans whose rollout was requested again.
    pub deploy: Vec<String>,
}

impl Reannounced {
    fn count(&self) -> usize {
        self.built.len() + self.finished.len() + self.integration.len() + self.deploy.len()
    }
}

/// Sweeps every `watchdog_interval` until `shutdown`.
pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(shared.watchdog_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(e) = sweep(&shared, now_ms()).await {
            tracing::warn!(error = %e, "watchdog sweep failed; trying again next time");
        }
    }
}

/// One pass over every live plan at time `now` (ms): announces again what
/// has been stranded for the stall threshold (see the module docs).
pub(crate) async fn sweep(shared: &Shared, now: i64) -> Result<Reannounced, StepError> {
    let store = shared.connections.store.as_ref();
    let stalled_before = now.saturating_sub(shared.watchdog_stall.as_millis() as i64);
    let mut out = Reannounced::default();
    for plan in store.plans().await? {
        match plan.status {
            // A plan out of budget still finishes its running work: its
            // stranded Built tasks are announced again too.
            PlanStatus::Running | PlanStatus::BudgetExhausted => {
                if plan.done + plan.failed + plan.blocked == plan.total {
                    if plan.updated_ms < stalled_before
                        && claim(shared, &format!("finish|{}", plan.id)).await?
                    {
                        tracing::warn!(plan_id = %plan.id, "watchdog: every task is final but the plan did not move on; stepping it again");
                        finish_plan(shared, &plan.id).await?;
                        out.finished.push(plan.id.clone());
                    }
                } else {
                    built_tasks(shared, &plan, stalled_before, &mut out).await?;
                }
            }
            PlanStatus::Integrating if plan.updated_ms < stalled_before => {
                integrating(shared, plan, &mut out).await?;
            }
            PlanStatus::Deploying if plan.updated_ms < stalled_before => {
                deploying(shared, &plan, &mut out).await?;
            }
            _ => {}
        }
    }
    let n = out.count();
    if n > 0 {
        if let Err(e) = store.incr(REANNOUNCED, n as i64).await {
            tracing::warn!(error = %e, "cannot count the watchdog's re-announcements");
        }
    }
    Ok(out)
}

/// Writes the announcement record for `key` unless one is live; true when
/// this caller should announce. Two replicas may both see it absent and
/// both announce: a duplicate, which consumers tolerate.
async fn claim(shared: &Shared, key: &str) -> Result<bool, StepError> {
    let store = shared.connections.store.as_ref();
    if store.kv_get(WATCHDOG, key).await?.is_some() {
        return Ok(false);
    }
    store
        .kv_put(
            WATCHDOG,
            key,
            &now_ms().to_string(),
            Some(shared.watchdog_stall),
        )
        .await?;
    Ok(true)
}

/// Built tasks of a running plan that have waited for QA past the stall
/// threshold: `task.built` again.
async fn built_tasks(
    shared: &Shared,
    plan: &PlanRecord,
    stalled_before: i64,
    out: &mut Reannounced,
) -> Result<(), StepError> {
    let tasks = shared.connections.store.tasks(&plan.id).await?;
    for task in tasks {
        if task.state != TaskState::Built || task.updated_ms >= stalled_before {
            continue;
        }
        let Some(artifact) = task.artifact.clone() else {
            continue;
        };
        let key = format!("built|{}|{}|{}", task.plan_id, task.attempt, task.path);
        if !claim(shared, &key).await? {
            continue;
        }
        tracing::warn!(
            plan_id = %task.plan_id,
            path = %task.path,
            attempt = task.attempt,
            "watchdog: task Built with no QA in flight; announcing task.built again"
        );
        shared
            .connections
            .publish(
                queues::TASK_BUILT,
                TaskBuilt {
                    plan_id: task.plan_id.clone(),
                    path: task.path.clone(),
                    attempt: task.attempt,
                    artifact,
                    cache_hit: false,
                    executor: REANNOUNCED_EXECUTOR.to_owned(),
                    reannounced: true,
                    duration_ms: 0,
                },
            )
            .await
            .map_err(StepError::Publish)?;
        out.built.push((task.plan_id, task.path));
    }
    Ok(())
}

/// An Integrating plan that stalled: every shard without a recorded result
/// is published again, then the tally is taken (in case every result is
/// in and only the verdict was never carried out).
async fn integrating(
    shared: &Shared,
    plan: PlanRecord,
    out: &mut Reannounced,
) -> Result<(), StepError> {
    let Ok(stages) = PlanStages::of(&plan) else {
        return Ok(());
    };
    if !claim(shared, &format!("integration|{}", plan.id)).await? {
        return Ok(());
    }
    let store = shared.connections.store.as_ref();
    let reported: HashSet<String> = store
        .kv_list(&integration::results_collection(&plan.id))
        .await?
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    let missing: Vec<_> = devfleet_contracts::integration::shards(&plan.id, &stages.integration)
        .into_iter()
        .filter(|w| !reported.contains(&integration::result_key(&w.step.name, w.shard_index)))
        .collect();
    tracing::warn!(
        plan_id = %plan.id,
        missing = missing.len(),
        "watchdog: integration stalled; publishing the shards without a result again"
    );
    for work in &missing {
        shared
            .connections
            .publish(queues::WORK_INTEGRATION, work.clone())
            .await
            .map_err(StepError::Publish)?;
    }
    out.integration.push((plan.id.clone(), missing.len()));
    effects::advance_with_tally(shared, plan).await
}

/// A Deploying plan whose rollout request was never confirmed.
async fn deploying(
    shared: &Shared,
    plan: &PlanRecord,
    out: &mut Reannounced,
) -> Result<(), StepError> {
    let store = shared.connections.store.as_ref();
    if Marker::DeploySent.get(store, &plan.id).await?.is_some() {
        return Ok(());
    }
    let Some(spec) = PlanStages::of(plan).ok().and_then(|s| s.deploy) else {
        return Ok(());
    };
    if !claim(shared, &format!("deploy|{}", plan.id)).await? {
        return Ok(());
    }
    tracing::warn!(plan_id = %plan.id, "watchdog: deploy.requested was never confirmed; requesting again");
    deploy::request(shared, &plan.id, &spec).await?;
    out.deploy.push(plan.id.clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{completion, direct_router, intake};
    use devfleet_bus::ConsumeOptions;
    use devfleet_protocol::{Envelope, IntegrationResult, Message};
    use devfleet_runtime::consume::Settlement;
    use devfleet_runtime::Connections;
    use devfleet_store::Fence;
    use std::time::Duration;

    const TASK: &str = "a.py";

    /// A one-task plan with the given `integration:` YAML, created through
    /// intake, its task leased and Built with artifact `h`.
    async fn built_plan(shared: &Arc<Shared>, id: &str, stages_yaml: &str) {
        let analyzed = crate::test_plans::one_task(id, TASK, None, stages_yaml);
        let settled = intake::handle(shared.clone(), Envelope::new(analyzed)).await;
        assert_eq!(settled, Settlement::Ack);
        let store = &shared.connections.store;
        let claimed = store
            .claim_next("w", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        store
            .mark_built(id, TASK, &Fence::of(&claimed), "h")
            .await
            .unwrap();
    }

    /// A time past the stall threshold of anything written now.
    fn stalled(shared: &Shared) -> i64 {
        now_ms() + shared.watchdog_stall.as_millis() as i64 + 1_000
    }

    async fn status(shared: &Shared, id: &str) -> PlanStatus {
        shared
            .connections
            .store
            .plan(id)
            .await
            .unwrap()
            .unwrap()
            .status
    }

    async fn next(shared: &Shared, queue: &str) -> Envelope {
        let mut consumer = shared
            .connections
            .consume(queue, ConsumeOptions::default())
            .await
            .unwrap();
        let (envelope, delivery) = consumer.next_envelope().await.unwrap().unwrap();
        delivery.ack().await.unwrap();
        envelope
    }

    #[tokio::test]
    async fn a_built_task_whose_qa_was_lost_is_announced_again_and_the_plan_finishes() {
        let shared = Shared::for_tests(Connections::in_memory());
        // The dev-worker stopped between mark_built and its task.built.
        built_plan(&shared, "p1", "").await;
        let depth = |s: Arc<Shared>| async move {
            s.connections.queue_depth(queues::TASK_BUILT).await.unwrap()
        };
        assert_eq!(depth(shared.clone()).await, 0);
        assert_eq!(
            sweep(&shared, now_ms()).await.unwrap(),
            Reannounced::default(),
            "not stalled yet: QA may still be running"
        );
        let at = stalled(&shared);
        let swept = sweep(&shared, at).await.unwrap();
        assert_eq!(swept.built, vec![("p1".to_owned(), TASK.to_owned())]);
        assert_eq!(
            sweep(&shared, at).await.unwrap(),
            Reannounced::default(),
            "announced once per stall threshold"
        );
        assert_eq!(
            shared.connections.store.counter(REANNOUNCED).await.unwrap(),
            1
        );
        let envelope = next(&shared, queues::TASK_BUILT).await;
        let Message::TaskBuilt(built) = &envelope.message else {
            panic!("not task.built: {envelope:?}");
        };
        assert_eq!(
            (
                built.attempt,
                built.artifact.as_str(),
                built.executor.as_str()
            ),
            (1, "h", REANNOUNCED_EXECUTOR)
        );
        // Routed on (here by the direct seam standing in for router and QA).
        assert_eq!(
            direct_router::handle_built(shared.clone(), envelope).await,
            Settlement::Ack
        );
        assert_eq!(status(&shared, "p1").await, PlanStatus::Succeeded);
    }

    #[tokio::test]
    async fn a_plan_whose_last_completion_never_ended_it_is_stepped_again() {
        let shared = Shared::for_tests(Connections::in_memory());
        built_plan(&shared, "p2", "").await;
        // The scheduler stopped between the completion and the plan's end.
        let store = &shared.connections.store;
        let done = store.complete("p2", TASK, &Fence::attempt(1), "h").await;
        assert!(done.unwrap().plan_finished);
        assert_eq!(status(&shared, "p2").await, PlanStatus::Running);
        assert_eq!(
            sweep(&shared, now_ms()).await.unwrap().finished,
            Vec::<String>::new()
        );
        let swept = sweep(&shared, stalled(&shared)).await.unwrap();
        assert_eq!(swept.finished, vec!["p2".to_owned()]);
        assert_eq!(status(&shared, "p2").await, PlanStatus::Succeeded);
    }

    #[tokio::test]
    async fn an_integrating_plan_with_lost_shards_gets_them_again_and_finishes() {
        let shared = Shared::for_tests(Connections::in_memory());
        built_plan(
            &shared,
            "p3",
            "integration:\n  - { name: unit, run: 'true', shard: 2 }\n",
        )
        .await;
        completion::complete(&shared, "p3", TASK, 1, "h")
            .await
            .unwrap();
        assert_eq!(status(&shared, "p3").await, PlanStatus::Integrating);
        // One shard reported; the other's message was lost.
        let result = |index| IntegrationResult {
            plan_id: "p3".into(),
            step: "unit".into(),
            shard_index: index,
            shard_count: 2,
            passed: true,
            output: String::new(),
            duration_ms: 1,
        };
        let handle = |r| integration::handle_result(shared.clone(), Envelope::new(r));
        assert_eq!(handle(result(0)).await, Settlement::Ack);
        let queue = shared.connections.queue(queues::WORK_INTEGRATION);
        assert_eq!(shared.connections.bus.purge(&queue).await.unwrap(), 2);

        assert!(sweep(&shared, now_ms())
            .await
            .unwrap()
            .integration
            .is_empty());
        let swept = sweep(&shared, stalled(&shared)).await.unwrap();
        assert_eq!(swept.integration, vec![("p3".to_owned(), 1)]);
        let Message::IntegrationWork(work) = next(&shared, queues::WORK_INTEGRATION).await.message
        else {
            panic!("not integration work");
        };
        assert_eq!((work.step.name.as_str(), work.shard_index), ("unit", 1));
        assert_eq!(handle(result(1)).await, Settlement::Ack);
        assert_eq!(status(&shared, "p3").await, PlanStatus::Succeeded);
    }
}
