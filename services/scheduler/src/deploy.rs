//! The hand-over to the canary: a plan whose tasks are Done and whose
//! integration passed (or that has none) and that has a `deploy` section
//! becomes Deploying (the lifecycle's [`crate::lifecycle::Effect::Enter`]),
//! and `deploy.requested` goes out with the spec and the plan id as the
//! deployment id ([`request`]).
//!
//! The canary reports how the rollout ended on `deploy.finished`
//! ([`handle_finished`]); the scheduler, which alone ends plans, steps the
//! lifecycle with it: Succeeded when promoted, Failed when rolled back
//! (only while the plan is still Deploying).

use crate::lifecycle::Event;
use crate::stages::Marker;
use crate::{effects, Shared};
use devfleet_protocol::{now_ms, queues, DeployRequested, DeploySpec, Envelope, Message};
use devfleet_runtime::consume::{self, Settlement, StepError};
use std::sync::Arc;

/// Handles one `deploy.finished` envelope: the canary's report that a
/// plan's rollout ended. A plan that is not Deploying (already ended, or a
/// report repeated) is left as it is.
pub(crate) async fn handle_finished(shared: Arc<Shared>, envelope: Envelope) -> Settlement {
    let Message::DeployFinished(finished) = envelope.message else {
        return consume::unexpected(&envelope, queues::DEPLOY_FINISHED);
    };
    let plan = match shared.connections.store.plan(&finished.plan_id).await {
        Ok(Some(plan)) => plan,
        Ok(None) => {
            tracing::warn!(plan_id = %finished.plan_id, "deploy.finished for an unknown plan");
            return Settlement::Ack;
        }
        Err(e) => return StepError::from(e).settlement("reading the deployed plan"),
    };
    let event = Event::DeployFinished {
        promoted: finished.promoted,
        message: finished.message,
    };
    match effects::advance(&shared, plan, event).await {
        Ok(()) => Settlement::Ack,
        Err(e) => e.settlement("ending the deployed plan"),
    }
}

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
