//! Delayed retries of failed attempts.
//!
//! When an attempt fails and may be retried, the router:
//!
//! 1. takes the task's lease over from the worker that failed
//!    ([`ROUTER_OWNER`](crate::ROUTER_OWNER), attempt kept) for the delay
//!    plus a grace period, so the scheduler's reaper does not make it ready
//!    early (dev failures; a QA failure leaves the task Built, which nothing
//!    dispatches);
//! 2. writes a [`RetryRecord`] (due time, error) to the collection
//!    [`RETRIES`] under the task key;
//! 3. publishes the `task.failed` message as a ticket on the router's own
//!    queue [`RETRY_QUEUE`], then acks the original.
//!
//! The ticket consumer redelivers a ticket with the bus's delayed
//! redelivery (`Delivery::retry(delay)`: RabbitMQ TTL queues, NATS nak with
//! delay) until its due time, so the wait lives in the broker and survives
//! a router restart. When due: a dev retry puts the task back in the ready
//! set (`requeue`, its class kept, the error carried to the executor); a QA
//! retry publishes `work.qa` again. A ticket whose record is gone or names
//! another attempt is stale and dropped.

use crate::history::{self, task_key};
use crate::{Router, ROUTER_OWNER};
use devfleet_protocol::{now_ms, Envelope, Message, QaWork, Stage, TaskClass, TaskFailed};
use devfleet_runtime::consume::{Settlement, StepError};
use devfleet_store::{
    ClaimOutcome, Fence, StoreError, StoreResult, TaskRecord, TaskState, TaskStore,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The router's delayed-retry queue (logical name; namespace applied).
pub const RETRY_QUEUE: &str = "router.retries";
/// Store collection of pending retries, keyed by task key.
pub const RETRIES: &str = "retries";

/// A pending retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryRecord {
    /// The attempt that failed.
    pub attempt: u32,
    pub stage: Stage,
    /// When the retry may start (ms since the epoch).
    pub due_ms: i64,
    /// The delay chosen (for logs and tests).
    pub delay_ms: u64,
    pub error: String,
}

async fn read(store: &dyn TaskStore, key: &str) -> StoreResult<Option<RetryRecord>> {
    match store.kv_get(RETRIES, key).await? {
        None => Ok(None),
        Some(json) => serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: format!("{RETRIES}/{key}"),
                reason: e.to_string(),
            }),
    }
}

/// Schedules the retry of `failed` after `failures` failures; returns the
/// delay chosen. Idempotent: a redelivered failure keeps the first record's
/// due time and publishes another ticket (the spare one finds nothing due
/// twice: the first to act deletes the record).
pub(crate) async fn schedule(
    router: &Router,
    failed: &TaskFailed,
    task: &TaskRecord,
    failures: u32,
) -> Result<Duration, StepError> {
    let store = router.connections.store.as_ref();
    let key = task_key(&failed.plan_id, &failed.path);
    let existing = read(store, &key)
        .await?
        .filter(|r| r.attempt == failed.attempt && r.stage == failed.stage);
    let record = match existing {
        Some(r) => r,
        None => {
            let delay = router.backoff.delay(failures);
            RetryRecord {
                attempt: failed.attempt,
                stage: failed.stage,
                due_ms: now_ms() + delay.as_millis() as i64,
                delay_ms: delay.as_millis() as u64,
                error: failed.error.clone(),
            }
        }
    };
    let delay = Duration::from_millis(record.delay_ms);
    if failed.stage == Stage::Dev && task.state == TaskState::Leased {
        hold(router, failed, task, delay).await?;
    }
    let json = serde_json::to_string(&record).map_err(|e| StepError::Invalid(e.to_string()))?;
    store.kv_put(RETRIES, &key, &json, None).await?;
    router
        .connections
        .publish(RETRY_QUEUE, failed.clone())
        .await
        .map_err(StepError::Publish)?;
    Ok(delay)
}

/// Takes the lease of a failed dev attempt over for the wait.
async fn hold(
    router: &Router,
    failed: &TaskFailed,
    task: &TaskRecord,
    delay: Duration,
) -> StoreResult<()> {
    let lease = delay + router.retry_lease_grace;
    let outcome = router
        .connections
        .store
        .claim(
            &failed.plan_id,
            &failed.path,
            ROUTER_OWNER,
            task.lease_owner.as_deref(),
            lease,
        )
        .await?;
    match outcome {
        ClaimOutcome::Claimed(t) if t.attempt == failed.attempt => {}
        other => tracing::warn!(
            plan_id = %failed.plan_id,
            path = %failed.path,
            ?other,
            "could not hold the failed task for its retry delay; it may be dispatched early"
        ),
    }
    Ok(())
}

/// Handles a ticket from [`RETRY_QUEUE`].
#[tracing::instrument(skip_all, fields(plan_id = tracing::field::Empty, path = tracing::field::Empty, attempt = tracing::field::Empty))]
pub(crate) async fn handle_ticket(router: Arc<Router>, envelope: Envelope) -> Settlement {
    let Message::TaskFailed(failed) = envelope.message else {
        return devfleet_runtime::consume::unexpected(&envelope, RETRY_QUEUE);
    };
    let span = tracing::Span::current();
    span.record("plan_id", failed.plan_id.as_str());
    span.record("path", failed.path.as_str());
    span.record("attempt", failed.attempt);
    match fire(&router, &failed).await {
        Ok(s) => s,
        Err(e) => e.settlement(&format!("retrying {} of {}", failed.path, failed.plan_id)),
    }
}

async fn fire(router: &Router, failed: &TaskFailed) -> Result<Settlement, StepError> {
    let store = router.connections.store.as_ref();
    let key = task_key(&failed.plan_id, &failed.path);
    let Some(record) = read(store, &key).await? else {
        return Ok(Settlement::Ack);
    };
    if record.attempt != failed.attempt || record.stage != failed.stage {
        return Ok(Settlement::Ack);
    }
    let now = now_ms();
    if now < record.due_ms {
        let wait = Duration::from_millis((record.due_ms - now) as u64);
        return Ok(Settlement::Delay(
            wait,
            "waiting for the retry backoff".into(),
        ));
    }
    let Some(task) = store.task(&failed.plan_id, &failed.path).await? else {
        store.kv_delete(RETRIES, &key).await?;
        return Ok(Settlement::Ack);
    };
    match record.stage {
        Stage::Dev => retry_dev(router, &task, &record).await?,
        Stage::Qa => retry_qa(router, &task, &record).await?,
        Stage::Integration => {}
    }
    store.kv_delete(RETRIES, &key).await?;
    Ok(Settlement::Ack)
}

async fn retry_dev(
    router: &Router,
    task: &TaskRecord,
    record: &RetryRecord,
) -> Result<(), StepError> {
    let ours = task.state == TaskState::Leased
        && task.lease_owner.as_deref() == Some(ROUTER_OWNER)
        && task.attempt == record.attempt;
    // Reaped back to Ready while we waited (routers down past the grace):
    // carry the error anyway.
    let reaped = task.state == TaskState::Ready && task.attempt == record.attempt;
    if !ours && !reaped {
        tracing::info!(
            plan_id = %task.plan_id,
            path = %task.path,
            state = task.state.as_str(),
            attempt = task.attempt,
            "retry is stale: the task moved on"
        );
        return Ok(());
    }
    let store = router.connections.store.as_ref();
    let error = format!("attempt {} failed: {}", record.attempt, record.error);
    // A failed fix attempt stays a fix and keeps the QA diagnostics it fixes.
    let carried = if task.class == TaskClass::Fix {
        let history = history::read(store, &task.plan_id, &task.path).await?;
        match history::last_qa_diagnostics(&history) {
            Some(d) => format!("{d}\n\n({error})"),
            None => error,
        }
    } else {
        error
    };
    // Fenced: our hold of the attempt's lease, or (reaped) the attempt.
    let fence = if ours {
        Fence::holder(ROUTER_OWNER, record.attempt)
    } else {
        Fence::attempt(record.attempt)
    };
    if let Err(e) = store
        .requeue(&task.plan_id, &task.path, &fence, task.class, Some(carried))
        .await
    {
        if e.is_stale() {
            tracing::info!(error = %e, "retry is stale: the task moved on");
            return Ok(());
        }
        return Err(e.into());
    }
    tracing::info!(
        plan_id = %task.plan_id,
        path = %task.path,
        attempt = record.attempt,
        delay_ms = record.delay_ms,
        "retry released to the scheduler"
    );
    Ok(())
}

async fn retry_qa(
    router: &Router,
    task: &TaskRecord,
    record: &RetryRecord,
) -> Result<(), StepError> {
    let (TaskState::Built, Some(artifact)) = (task.state, task.artifact.clone()) else {
        return Ok(());
    };
    if task.attempt != record.attempt {
        return Ok(());
    }
    crate::routes::dispatch_qa(
        router,
        QaWork {
            plan_id: task.plan_id.clone(),
            path: task.path.clone(),
            attempt: task.attempt,
            artifact,
        },
    )
    .await
}
