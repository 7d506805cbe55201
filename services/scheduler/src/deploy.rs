//! The hand-over to the canary: a plan whose tasks are Done and whose
//! integration passed (or that has none) and that has a `deploy` section
//! becomes Deploying (the lifecycle's [`crate::lifecycle::Effect::Enter`]),
//! and `deploy.requested` goes out with the spec and the plan id as the
//! deployment id ([`request`]).
//!
//! From then on the canary owns the plan's outcome: it sets it Succeeded
//! when the rollout is promoted and Failed when it is rolled back (only
//! while the plan is still Deploying; see docs/CANARY.md).

use crate::stages::Marker;
use crate::Shared;
use devfleet_protocol::{now_ms, queues, DeployRequested, DeploySpec};
use devfleet_runtime::consume::StepError;

/// Requests a plan's rollout, unless an earlier call had the request
/// confirmed. The canary accepts an identical request for an existing
/// deployment as a duplicate, so a request repeated after an interruption
/// is harmless.
#[tracing::instrument(skip_all, fields(plan_id = %plan_id))]
pub(crate) async fn request(
    shared: &Shared,
    plan_id: &str,
    spec: &DeploySpec,
) -> Result<(), StepError> {
    let store = shared.connections.store.as_ref();
    if Marker::DeploySent.get(store, plan_id).await?.is_some() {
        return Ok(());
    }
    shared
        .connections
        .publish(
            queues::DEPLOY_REQUESTED,
            DeployRequested {
                deployment_id: plan_id.to_owned(),
                plan_id: Some(plan_id.to_owned()),
                spec: spec.clone(),
            },
        )
        .await
        .map_err(StepError::Publish)?;
    Marker::DeploySent
        .set(store, plan_id, &now_ms().to_string())
        .await?;
    tracing::info!(deployment = %plan_id, "deploy requested");
    Ok(())
}
