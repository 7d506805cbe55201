//! Consuming `deploy.requested`: record the deployment, then ack.
//!
//! * A valid request with a new id is recorded (kv `canary`, put-if-absent,
//!   so two replicas receiving duplicates create it once) and marked active;
//!   the delivery is acked only after both writes.
//! * A redelivery of the same message, or a request identical to an
//!   existing deployment (same spec and plan), is acked without effect.
//! * An invalid request, or a different request reusing an existing id, is
//!   refused: dead-lettered with the reason, and a `deployment` metric
//!   with `event: "refused"` says why.
//! * A store failure retries the delivery with backoff.

use crate::record::{self, DeploymentRecord, ACTIVE, RECORDS};
use crate::supervisor::Ctx;
use devfleet_bus::ConsumeOptions;
use devfleet_protocol::{metrics::DeploymentRefused, queues, DeployRequested, Envelope, Message};
use devfleet_runtime::consume::{self, Consume, Inflight, Settlement};
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// What became of a request.
#[derive(Debug, PartialEq)]
enum Outcome {
    Accepted,
    Duplicate,
    Refused(String),
}

/// What the handler needs: the service and the driver's wake-up.
struct Intake {
    ctx: Arc<Ctx>,
    wake: Arc<Notify>,
}

/// Consumes `deploy.requested` one request at a time until `shutdown`
/// (the request in hand is finished first).
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let connections = ctx.config.connections.clone();
    tracing::info!(
        "canary consuming {}",
        connections.queue(queues::DEPLOY_REQUESTED)
    );
    let options = ConsumeOptions::default().max_attempts(ctx.config.max_attempts);
    Consume::new(connections, queues::DEPLOY_REQUESTED)
        .options(options)
        .concurrency(1)
        .read_ahead(4)
        .run(Arc::new(Intake { ctx, wake }), shutdown, handle)
        .await
}

async fn handle(intake: Arc<Intake>, envelope: Envelope, inflight: Inflight) -> Settlement {
    let Message::DeployRequested(request) = envelope.message else {
        return consume::unexpected(&envelope, queues::DEPLOY_REQUESTED);
    };
    let span = tracing::info_span!(
        "deploy_requested",
        deployment = %request.deployment_id,
        plan_id = request.plan_id.as_deref().unwrap_or(""),
    );
    async {
        match accept(&intake.ctx, &envelope.id, request).await {
            Ok(Outcome::Accepted) => {
                // The record is durable: ack, then wake the driver.
                inflight.settle_now(Settlement::Ack).await;
                intake.wake.notify_one();
                Settlement::Ack
            }
            Ok(Outcome::Duplicate) => Settlement::Ack,
            Ok(Outcome::Refused(reason)) => Settlement::DeadLetter(reason),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "deployment could not be recorded; retrying");
                Settlement::Retry(format!("{e:#}"))
            }
        }
    }
    .instrument(span)
    .await
}

/// Records one request. An error means nothing durable could be decided
/// (the delivery is retried).
async fn accept(ctx: &Ctx, request_id: &str, request: DeployRequested) -> anyhow::Result<Outcome> {
    let store = &ctx.config.connections.store;
    let id = request.deployment_id.clone();
    if let Err(e) = crate::request::validate_request(&request) {
        return Ok(refuse(ctx, &request, e.to_string()).await);
    }
    let record = DeploymentRecord::new(
        id.clone(),
        request.plan_id.clone(),
        request_id.to_owned(),
        request.spec.clone(),
        devfleet_protocol::now_ms(),
    );
    if store
        .kv_put_new(RECORDS, &id, &serde_json::to_string(&record)?)
        .await?
    {
        store.kv_put(ACTIVE, &id, "", None).await?;
        tracing::info!(stages = ?request.spec.stages, "deployment accepted");
        emit(ctx, &record, "accepted", None).await;
        return Ok(Outcome::Accepted);
    }
    let Some(existing) = record::load(store, &id).await? else {
        anyhow::bail!("deployment '{id}' vanished while being created; retrying");
    };
    if existing.request_id == request_id {
        // Our own earlier delivery got this far before dying: finish it.
        if !existing.status.is_final() {
            store.kv_put(ACTIVE, &id, "", None).await?;
        }
        return Ok(Outcome::Duplicate);
    }
    if existing.spec == request.spec && existing.plan_id == request.plan_id {
        tracing::info!(
            status = existing.status.as_str(),
            "identical request for an existing deployment; nothing to do"
        );
        return Ok(Outcome::Duplicate);
    }
    let reason = format!(
        "deployment id '{id}' is already used by a different deployment ({}, created at {} ms); \
         choose another id",
        existing.status.as_str(),
        existing.created_ms
    );
    Ok(refuse(ctx, &request, reason).await)
}

async fn refuse(ctx: &Ctx, request: &DeployRequested, reason: String) -> Outcome {
    tracing::warn!(%reason, "deployment refused");
    ctx.metrics
        .emit(DeploymentRefused::new(
            request.deployment_id.clone(),
            request.plan_id.clone(),
            reason.clone(),
        ))
        .await;
    Outcome::Refused(reason)
}

async fn emit(ctx: &Ctx, record: &DeploymentRecord, event: &str, reason: Option<&str>) {
    ctx.metrics
        .emit(crate::driver::metric_data(
            record,
            event,
            reason,
            &ctx.config.instance,
        ))
        .await;
}
