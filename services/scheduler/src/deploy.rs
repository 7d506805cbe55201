//! The hand-over to the canary: a plan whose tasks are Done and whose
//! integration passed (or that has none) and that has a `deploy` section
//! becomes Deploying, and `deploy.requested` goes out with the spec and
//! the plan id as the deployment id.
//!
//! From then on the canary owns the plan's outcome: it sets it Succeeded
//! when the rollout is promoted and Failed when it is rolled back (only
//! while the plan is still Deploying; see docs/CANARY.md).

use crate::completion;
use crate::stages::Marker;
use crate::Shared;
use devfleet_protocol::{now_ms, queues, DeployRequested, DeploySpec, PlanStatus};
use devfleet_runtime::consume::StepError;
use devfleet_store::PlanRecord;

/// Moves a plan to Deploying and requests its rollout, once. A repeated
/// call (redelivery, or after an interruption) writes the status again
/// only if the plan has not moved past it, and publishes the request again
/// only if no earlier call had it confirmed; the canary accepts an
/// identical request for an existing deployment as a duplicate.
#[tracing::instrument(skip_all, fields(plan_id = %plan.id))]
pub(crate) async fn request(
    shared: &Shared,
    plan: &PlanRecord,
    spec: &DeploySpec,
) -> Result<(), StepError> {
    let store = shared.connections.store.as_ref();
    let message = format!(
        "canary rollout requested (deployment '{}', stages {:?})",
        plan.id, spec.stages
    );
    if Marker::Deploying
        .claim(store, &plan.id, &now_ms().to_string())
        .await?
    {
        completion::end_plan(shared, plan, PlanStatus::Deploying, Some(message)).await?;
    } else {
        let status = store.plan(&plan.id).await?.map(|p| p.status);
        if matches!(status, Some(PlanStatus::Running | PlanStatus::Integrating)) {
            // The call that claimed the stage stopped before the status.
            store
                .set_plan_status(&plan.id, PlanStatus::Deploying, Some(message))
                .await?;
        }
    }
    if Marker::DeploySent.get(store, &plan.id).await?.is_none() {
        shared
            .connections
            .publish(
                queues::DEPLOY_REQUESTED,
                DeployRequested {
                    deployment_id: plan.id.clone(),
                    plan_id: Some(plan.id.clone()),
                    spec: spec.clone(),
                },
            )
            .await
            .map_err(StepError::Publish)?;
        Marker::DeploySent
            .set(store, &plan.id, &now_ms().to_string())
            .await?;
        tracing::info!(deployment = %plan.id, "deploy requested");
    }
    Ok(())
}
