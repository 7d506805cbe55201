//! The integration stage: once every task of a plan is Done, the plan's
//! `integration` steps run on qa-workers, and their results decide the plan.
//!
//! The lifecycle ([`crate::lifecycle`]) decides; this module holds the
//! stage's pieces its edge ([`crate::effects`]) uses:
//!
//! * [`publish_shards`]: one `work.integration` message per shard
//!   (`devfleet_contracts::integration::shards`), once (a stage marker).
//! * [`handle_result`] consumes `integration.results`: each result is kept
//!   put-if-absent in the collection `integration.<plan_id>` under
//!   `<step>#<shard>`, so a redelivered result counts once (the first one
//!   for a shard wins). Then the plan's lifecycle steps with the tally of
//!   everything kept ([`tally`], `devfleet_contracts::integration::IntegrationTally`).
//! * Every shard passed: Deploying and `deploy.requested` when the plan has
//!   a `deploy` section ([`crate::deploy`]), else Succeeded. Any shard
//!   failed (once all reported): Failed, with a message naming each failed
//!   step and the end of its output, and an `escalation` event
//!   ([`escalate`]). There is no fix loop for integration yet: the plan's
//!   author or the planner decides.

use crate::effects;
use crate::lifecycle::{self, Verdict, MAX_MESSAGE_CHARS};
use crate::stages::{Marker, PlanStages};
use crate::Shared;
use devfleet_contracts::integration::{IntegrationTally, TallyState};
use devfleet_protocol::{
    metrics::IntegrationFailure, now_ms, queues, AttemptRecord, Envelope, Escalation,
    IntegrationResult, IntegrationStep, IntegrationWork, Message, Stage,
};
use devfleet_runtime::consume::{self, Settlement, StepError};
use devfleet_store::PlanRecord;
use std::sync::Arc;

/// The store collection holding a plan's integration results.
pub fn results_collection(plan_id: &str) -> String {
    format!("integration.{plan_id}")
}

/// The key of one shard's result in [`results_collection`].
pub fn result_key(step: &str, shard_index: u32) -> String {
    format!("{step}#{shard_index}")
}

/// Publishes every shard of a plan's integration steps, unless an earlier
/// call had them all confirmed. Republishing after an interrupted call may
/// run a shard twice; its first result is the one that counts.
pub(crate) async fn publish_shards(
    shared: &Shared,
    plan_id: &str,
    steps: &[IntegrationStep],
) -> Result<(), StepError> {
    let store = shared.connections.store.as_ref();
    if Marker::IntegrationSent.get(store, plan_id).await?.is_some() {
        return Ok(());
    }
    let work = devfleet_contracts::integration::shards(plan_id, steps);
    let published = futures::future::join_all(work.iter().map(|w| {
        shared
            .connections
            .publish(queues::WORK_INTEGRATION, w.clone())
    }))
    .await;
    for p in published {
        p.map_err(StepError::Publish)?;
    }
    Marker::IntegrationSent
        .set(store, plan_id, &work.len().to_string())
        .await?;
    Ok(())
}

/// Handles one `integration.results` envelope.
pub(crate) async fn handle_result(shared: Arc<Shared>, envelope: Envelope) -> Settlement {
    match envelope.message {
        Message::IntegrationResult(result) => record(&shared, result).await,
        _ => consume::unexpected(&envelope, queues::INTEGRATION_RESULTS),
    }
}

#[tracing::instrument(
    skip_all,
    fields(plan_id = %result.plan_id, step = %result.step, shard = result.shard_index, passed = result.passed)
)]
async fn record(shared: &Shared, result: IntegrationResult) -> Settlement {
    let store = shared.connections.store.as_ref();
    let plan = match store.plan(&result.plan_id).await {
        Ok(Some(plan)) => plan,
        Ok(None) => {
            return Settlement::DeadLetter(format!(
                "integration result for plan '{}', which does not exist",
                result.plan_id
            ))
        }
        Err(e) => return Settlement::from_store_error("reading the plan", e),
    };
    let stages = match PlanStages::of(&plan) {
        Ok(stages) => stages,
        Err(message) => return Settlement::DeadLetter(message),
    };
    let work = devfleet_contracts::integration::shards(&plan.id, &stages.integration);
    let expected = work.iter().any(|w| {
        w.step.name == result.step
            && w.shard_index == result.shard_index
            && w.shard_count == result.shard_count
    });
    if !expected {
        return Settlement::DeadLetter(format!(
            "integration result for step '{}' shard {} of {}, which plan '{}' does not have",
            result.step, result.shard_index, result.shard_count, plan.id
        ));
    }
    let json = match serde_json::to_string(&result) {
        Ok(json) => json,
        Err(e) => return Settlement::DeadLetter(format!("cannot serialise the result: {e}")),
    };
    match store
        .kv_put_new(
            &results_collection(&plan.id),
            &result_key(&result.step, result.shard_index),
            &json,
        )
        .await
    {
        Ok(true) => tracing::info!(
            duration_ms = result.duration_ms,
            "integration shard result recorded"
        ),
        Ok(false) => {
            tracing::info!("a result for this shard is already recorded; the first one counts")
        }
        Err(e) => return Settlement::from_store_error("recording the integration result", e),
    }
    let outcome = effects::advance_with_tally(shared, plan).await;
    match outcome {
        Ok(()) => Settlement::Ack,
        Err(e) => e.settlement("deciding the integration verdict"),
    }
}

/// Rebuilds a plan's tally from every recorded result, and the verdict so
/// far.
pub(crate) async fn tally(
    shared: &Shared,
    plan_id: &str,
    steps: &[IntegrationStep],
) -> Result<(IntegrationTally, Verdict), StepError> {
    let store = shared.connections.store.as_ref();
    let work: Vec<IntegrationWork> = devfleet_contracts::integration::shards(plan_id, steps);
    let mut tally = IntegrationTally::new(plan_id, &work);
    for (key, json) in store.kv_list(&results_collection(plan_id)).await? {
        match serde_json::from_str::<IntegrationResult>(&json) {
            Ok(result) => {
                tally.record(result);
            }
            Err(e) => {
                tracing::warn!(plan_id, %key, error = %e, "a recorded integration result is unreadable; ignored")
            }
        }
    }
    let verdict = match tally.state() {
        TallyState::Pending { missing } => Verdict::Pending { missing },
        TallyState::Passed => Verdict::Passed,
        TallyState::Failed => Verdict::Failed {
            summary: tally.failure_summary(MAX_MESSAGE_CHARS),
        },
    };
    Ok((tally, verdict))
}

/// Escalates a failed integration: an `escalation` event with one history
/// record per failed shard, and an error metric naming them (best effort).
pub(crate) async fn escalate(shared: &Shared, plan: &PlanRecord, tally: &IntegrationTally) {
    let summary = tally.failure_summary(MAX_MESSAGE_CHARS);
    let at_ms = now_ms();
    let history = tally
        .failures()
        .into_iter()
        .map(|r| AttemptRecord {
            attempt: 1,
            stage: Stage::Integration,
            error: lifecycle::truncate(format!(
                "integration step '{}' shard {}/{} failed after {} ms:\n{}",
                r.step,
                r.shard_index + 1,
                r.shard_count,
                r.duration_ms,
                r.output
            )),
            at_ms,
        })
        .collect();
    shared
        .connections
        .event(Escalation {
            plan_id: plan.id.clone(),
            path: None,
            reason: summary.trim_end().to_owned(),
            history,
        })
        .await;
    shared
        .metrics
        .emit(IntegrationFailure {
            plan_id: plan.id.clone(),
            failed_steps: tally
                .failures()
                .iter()
                .map(|r| format!("{}#{}", r.step, r.shard_index))
                .collect(),
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{completion, intake};
    use devfleet_bus::ConsumeOptions;
    use devfleet_protocol::{PlanAnalyzed, PlanStatus};
    use devfleet_runtime::Connections;
    use std::time::Duration;

    const TASK: &str = "a.py";

    /// A one-task plan with the given `integration:`/`deploy:` YAML,
    /// created through intake and with its task completed.
    async fn done_plan(shared: &Arc<Shared>, id: &str, stages_yaml: &str) -> PlanAnalyzed {
        let analyzed = crate::test_plans::one_task(id, TASK, Some("x = 1"), stages_yaml);
        let settled = intake::handle(shared.clone(), Envelope::new(analyzed.clone())).await;
        assert_eq!(settled, Settlement::Ack);
        let store = &shared.connections.store;
        let task = store
            .claim_next("dispatch", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        store
            .mark_built(id, &task.path, &devfleet_store::Fence::of(&task), "h")
            .await
            .unwrap();
        completion::complete(shared, id, &task.path, task.attempt, "h")
            .await
            .unwrap();
        analyzed
    }

    fn result(plan_id: &str, step: &str, index: u32, count: u32, passed: bool) -> Envelope {
        Envelope::new(IntegrationResult {
            plan_id: plan_id.into(),
            step: step.into(),
            shard_index: index,
            shard_count: count,
            passed,
            output: format!(
                "{step} shard {index} says {}",
                if passed { "ok" } else { "boom" }
            ),
            duration_ms: 5,
        })
    }

    async fn status(shared: &Shared, id: &str) -> (PlanStatus, Option<String>) {
        let p = shared.connections.store.plan(id).await.unwrap().unwrap();
        (p.status, p.message)
    }

    async fn depth(shared: &Shared, queue: &str) -> u64 {
        shared.connections.queue_depth(queue).await.unwrap()
    }

    const TWO_STEPS: &str = "integration:\n  - { name: unit, run: 'python3 -m pytest', shard: 2 }\n  - { name: smoke, run: 'python3 smoke.py' }\n";
    const DEPLOY: &str =
        "deploy:\n  shift: { profile: lb }\n  health: { url: 'http://127.0.0.1:9/stats' }\n";

    #[tokio::test]
    async fn finishing_a_plan_twice_enters_integration_once() {
        let shared = Shared::for_tests(Connections::in_memory());
        done_plan(&shared, "p1", TWO_STEPS).await;
        assert_eq!(status(&shared, "p1").await.0, PlanStatus::Integrating);
        assert_eq!(depth(&shared, queues::WORK_INTEGRATION).await, 3);
        completion::finish_plan(&shared, "p1").await.unwrap();
        // A redelivered completion of the last task finishes the plan again.
        completion::complete(&shared, "p1", TASK, 1, "h")
            .await
            .unwrap();
        assert_eq!(
            depth(&shared, queues::WORK_INTEGRATION).await,
            3,
            "shards published once"
        );
        assert_eq!(status(&shared, "p1").await.0, PlanStatus::Integrating);
    }

    #[tokio::test]
    async fn a_redelivered_result_counts_once_and_a_failed_shard_fails_the_plan() {
        let connections = Connections::in_memory();
        let mut escalations = connections
            .broadcast
            .listen(&devfleet_protocol::queues::event_subject("escalation"))
            .await
            .unwrap();
        let shared = Shared::for_tests(connections);
        done_plan(&shared, "p2", TWO_STEPS).await;
        let s = shared.clone();
        let handle = |e| handle_result(s.clone(), e);
        assert_eq!(
            handle(result("p2", "unit", 0, 2, true)).await,
            Settlement::Ack
        );
        // A second result for the same shard does not count.
        assert_eq!(
            handle(result("p2", "unit", 0, 2, false)).await,
            Settlement::Ack
        );
        assert_eq!(
            handle(result("p2", "smoke", 0, 1, false)).await,
            Settlement::Ack
        );
        assert_eq!(
            status(&shared, "p2").await.0,
            PlanStatus::Integrating,
            "one shard is missing"
        );
        assert_eq!(
            handle(result("p2", "unit", 1, 2, true)).await,
            Settlement::Ack
        );
        let (st, message) = status(&shared, "p2").await;
        assert_eq!(st, PlanStatus::Failed);
        let message = message.unwrap_or_default();
        assert!(
            message.contains("'smoke'") && message.contains("boom"),
            "{message}"
        );
        assert!(
            !message.contains("'unit'"),
            "the duplicate failure did not count: {message}"
        );
        let (_, payload) = tokio::time::timeout(Duration::from_secs(5), escalations.next())
            .await
            .unwrap()
            .unwrap();
        let Message::Escalation(e) = Envelope::decode(&payload).unwrap().message else {
            panic!("not an escalation")
        };
        assert_eq!((e.plan_id.as_str(), e.path.as_deref()), ("p2", None));
        assert_eq!(e.history.len(), 1);
        assert_eq!(e.history[0].stage, Stage::Integration);
        // A late result changes nothing.
        assert_eq!(
            handle(result("p2", "unit", 1, 2, true)).await,
            Settlement::Ack
        );
        assert_eq!(status(&shared, "p2").await.0, PlanStatus::Failed);
    }

    #[tokio::test]
    async fn passed_integration_succeeds_a_plan_without_deploy() {
        let shared = Shared::for_tests(Connections::in_memory());
        done_plan(
            &shared,
            "p3",
            "integration:\n  - { name: ok, run: 'true' }\n",
        )
        .await;
        assert_eq!(
            handle_result(shared.clone(), result("p3", "ok", 0, 1, true)).await,
            Settlement::Ack
        );
        assert_eq!(status(&shared, "p3").await.0, PlanStatus::Succeeded);
    }

    #[tokio::test]
    async fn passed_integration_with_deploy_requests_the_rollout_once() {
        let shared = Shared::for_tests(Connections::in_memory());
        let analyzed = done_plan(&shared, "p4", &format!("{TWO_STEPS}{DEPLOY}")).await;
        for (step, i, n) in [
            ("unit", 0, 2),
            ("unit", 1, 2),
            ("smoke", 0, 1),
            ("smoke", 0, 1),
        ] {
            assert_eq!(
                handle_result(shared.clone(), result("p4", step, i, n, true)).await,
                Settlement::Ack
            );
        }
        completion::finish_plan(&shared, "p4").await.unwrap();
        assert_eq!(status(&shared, "p4").await.0, PlanStatus::Deploying);
        assert_eq!(
            depth(&shared, queues::DEPLOY_REQUESTED).await,
            1,
            "requested once"
        );
        let mut consumer = shared
            .connections
            .consume(queues::DEPLOY_REQUESTED, ConsumeOptions::default())
            .await
            .unwrap();
        let (envelope, delivery) = consumer.next_envelope().await.unwrap().unwrap();
        delivery.ack().await.unwrap();
        let Message::DeployRequested(request) = envelope.message else {
            panic!("not a deploy request")
        };
        assert_eq!(request.deployment_id, "p4");
        assert_eq!(request.plan_id.as_deref(), Some("p4"));
        assert_eq!(Some(request.spec), analyzed.plan.deploy);
    }

    #[tokio::test]
    async fn a_plan_with_deploy_and_no_integration_goes_straight_to_deploying() {
        let shared = Shared::for_tests(Connections::in_memory());
        done_plan(&shared, "p5", DEPLOY).await;
        assert_eq!(status(&shared, "p5").await.0, PlanStatus::Deploying);
        assert_eq!(depth(&shared, queues::WORK_INTEGRATION).await, 0);
        assert_eq!(depth(&shared, queues::DEPLOY_REQUESTED).await, 1);
        // The canary settles the plan; a late completion leaves it alone.
        shared
            .connections
            .store
            .set_plan_status("p5", PlanStatus::Succeeded, None)
            .await
            .unwrap();
        completion::complete(&shared, "p5", TASK, 1, "h")
            .await
            .unwrap();
        assert_eq!(status(&shared, "p5").await.0, PlanStatus::Succeeded);
        assert_eq!(depth(&shared, queues::DEPLOY_REQUESTED).await, 1);
    }

    #[tokio::test]
    async fn a_result_for_a_shard_the_plan_does_not_have_is_dead_lettered() {
        let shared = Shared::for_tests(Connections::in_memory());
        done_plan(&shared, "p6", TWO_STEPS).await;
        let settled = handle_result(shared.clone(), result("p6", "unit", 5, 6, true)).await;
        assert!(
            matches!(settled, Settlement::DeadLetter(ref r) if r.contains("does not have")),
            "{settled:?}"
        );
        let settled = handle_result(shared.clone(), result("nope", "unit", 0, 2, true)).await;
        assert!(matches!(settled, Settlement::DeadLetter(_)), "{settled:?}");
    }
}
