//! One task from `work.dev`: claim, build, record, publish, settle.
//!
//! [`intake`] reads deliveries and gives each a task that waits for a slot
//! and then runs [`handle`]. The store decides who runs a task: a worker
//! only builds what its `claim` returned as `Claimed`, and acks (drops) a
//! message for a task someone else holds or that is no longer claimable.
//!
//! | what happened                          | delivery                           |
//! |----------------------------------------|------------------------------------|
//! | built (or cache hit), `task.built` sent | ack                                |
//! | executor failed, `task.failed` sent     | ack                                |
//! | task held by another worker / final     | ack (duplicate)                    |
//! | lease lost while building               | ack, nothing published             |
//! | store or broker unreachable             | retry with backoff                 |
//! | shutdown grace ran out                  | left unsettled → redelivered       |
//!
//! A redelivered message for a task already Built (its worker died between
//! recording the artifact and publishing) re-announces `task.built`, so the
//! task is never stranded in Built.

use crate::cache_key::{cache_key, CacheKeyInput};
use crate::executor::{ExecError, ExecInput};
use crate::slots::Slot;
use crate::{Worker, CACHE_HITS, CACHE_MISSES};
use devfleet_bus::{BusError, ConsumeOptions, Consumer, Delivery, RetryOutcome};
use devfleet_contracts::capacity::DISPATCH_OWNER;
use devfleet_protocol::metrics::{BuildFailure, BuildTiming};
use devfleet_protocol::{
    now_ms, queues, Envelope, Message, Stage, TaskBuilt, TaskClass, TaskFailed, TaskWork,
};
use devfleet_runtime::backoff::Backoff;
use devfleet_store::{ClaimOutcome, StoreError, TaskRecord, TaskState};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::Instrument as _;

/// Deliveries of one message (transient failures) before it is
/// dead-lettered. The task itself is not lost then: its lease expires and
/// the scheduler dispatches it again.
const MAX_DELIVERIES: u32 = 20;

const RETRY_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    factor: 2.0,
    cap: Duration::from_secs(30),
    jitter: 0.5,
};

/// Consumes `work.dev` until `shutdown`; every delivery becomes a task in
/// `tracker` that waits for a slot (or for `stop_waiting`) and runs.
/// Returns the consumer, still open, so the caller closes it only after the
/// tracked tasks settled their deliveries.
pub(crate) async fn intake(
    worker: Arc<Worker>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    stop_waiting: &CancellationToken,
    hard_stop: &CancellationToken,
) -> (Option<Consumer>, anyhow::Result<()>) {
    let queue = worker.connections.queue(queues::WORK_DEV);
    let options = ConsumeOptions::default()
        .prefetch(u16::try_from(worker.scale.max).unwrap_or(u16::MAX))
        .max_attempts(MAX_DELIVERIES)
        .ack_wait(worker.exec_timeout + worker.lease);
    let mut consumer: Option<Consumer> = None;
    let mut failures = 0u32;
    loop {
        let current = match consumer.as_mut() {
            Some(c) => c,
            None => {
                let started = tokio::select! {
                    _ = shutdown.cancelled() => return (None, Ok(())),
                    c = worker.connections.bus.consume(&queue, options.clone()) => c,
                };
                match started {
                    Ok(c) => consumer.insert(c),
                    Err(BusError::Closed) => {
                        return (
                            None,
                            Err(anyhow::anyhow!("the bus closed while consuming {queue}")),
                        )
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(%queue, error = %e, "cannot start consumer; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return (None, Ok(())),
                            _ = tokio::time::sleep(RETRY_BACKOFF.delay(failures)) => {}
                        }
                        continue;
                    }
                }
            }
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => None,
            n = current.next_envelope() => Some(n),
        };
        let Some(next) = next else {
            return (consumer, Ok(()));
        };
        match next {
            None => {
                consumer = None;
                failures += 1;
                tracing::warn!(%queue, "consumer closed; restarting it");
                tokio::select! {
                    _ = shutdown.cancelled() => return (None, Ok(())),
                    _ = tokio::time::sleep(RETRY_BACKOFF.delay(failures)) => {}
                }
            }
            Some(Err(e)) => {
                failures += 1;
                tracing::warn!(%queue, error = %e, "consume error");
                tokio::select! {
                    _ = shutdown.cancelled() => return (consumer, Ok(())),
                    _ = tokio::time::sleep(RETRY_BACKOFF.delay(failures)) => {}
                }
            }
            Some(Ok((envelope, delivery))) => {
                failures = 0;
                worker.waiting.fetch_add(1, Ordering::Relaxed);
                worker.capacity_changed.notify_one();
                let worker = worker.clone();
                let stop_waiting = stop_waiting.clone();
                let hard_stop = hard_stop.clone();
                tracker.spawn(async move {
                    let slot = tokio::select! {
                        s = worker.slots.acquire() => Some(s),
                        _ = stop_waiting.cancelled() => None,
                    };
                    worker.waiting.fetch_sub(1, Ordering::Relaxed);
                    worker.capacity_changed.notify_one();
                    match slot {
                        Some(slot) => handle(&worker, envelope, delivery, slot, &hard_stop).await,
                        // Shutting down: hand it back unsettled.
                        None => drop(delivery),
                    }
                });
            }
        }
    }
}

/// What to do with the delivery.
#[derive(Debug)]
enum Settle {
    Ack,
    Retry(String),
    DeadLetter(String),
    /// Leave it unsettled: the broker redelivers it when the consumer closes.
    HandBack,
}

/// Handles one delivery holding `slot`; settles it.
async fn handle(
    worker: &Arc<Worker>,
    envelope: Envelope,
    delivery: Delivery,
    slot: Slot,
    hard_stop: &CancellationToken,
) {
    let Message::TaskWork(work) = envelope.message else {
        let reason = format!(
            "unexpected message kind '{}' on {}",
            envelope.kind(),
            queues::WORK_DEV
        );
        settle(delivery, Settle::DeadLetter(reason)).await;
        return;
    };
    let span = tracing::info_span!(
        "dev_task",
        plan_id = %work.plan_id,
        path = %work.path,
        attempt = work.attempt,
        delivery_attempt = delivery.attempt,
        instance = %worker.instance,
    );
    devfleet_telemetry::set_parent(&span, envelope.traceparent.as_deref());
    async {
        let outcome = if worker.start_running(&work.plan_id, &work.path) {
            let outcome = process(worker, &work, delivery.attempt, hard_stop).await;
            worker.stop_running(&work.plan_id, &work.path);
            outcome
        } else {
            tracing::debug!("already running here; dropping the duplicate");
            Settle::Ack
        };
        settle(delivery, outcome).await;
    }
    .instrument(span)
    .await;
    drop(slot);
    worker.capacity_changed.notify_one();
}

async fn settle(delivery: Delivery, settle: Settle) {
    let attempt = delivery.attempt;
    let result = match settle {
        Settle::Ack => delivery.ack().await,
        Settle::Retry(reason) => {
            tracing::warn!(%reason, attempt, "retrying the message later");
            match delivery.retry(RETRY_BACKOFF.delay(attempt), &reason).await {
                Ok(RetryOutcome::DeadLettered) => {
                    tracing::error!(%reason, "gave up on the message; dead-lettered (the lease expiry brings the task back)");
                    Ok(())
                }
                Ok(RetryOutcome::Scheduled) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Settle::DeadLetter(reason) => {
            tracing::error!(%reason, "dead-lettering the message");
            delivery.dead_letter(&reason).await
        }
        Settle::HandBack => {
            tracing::info!("handing the task back unfinished");
            drop(delivery);
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "settling failed; the broker will redeliver");
    }
}

/// The delivery outcome for a store error.
fn store_failure(what: &str, err: StoreError) -> Settle {
    match err {
        StoreError::Backend(_) | StoreError::Connect { .. } => {
            Settle::Retry(format!("{what}: {err}"))
        }
        StoreError::InvalidState { .. } => {
            tracing::warn!(error = %err, "{what}: the task moved on; dropping the message");
            Settle::Ack
        }
        _ => Settle::DeadLetter(format!("{what}: {err}")),
    }
}

async fn process(
    worker: &Worker,
    work: &TaskWork,
    delivery_attempt: u32,
    hard_stop: &CancellationToken,
) -> Settle {
    let store = &worker.connections.store;
    let claim = store
        .claim(
            &work.plan_id,
            &work.path,
            &worker.instance,
            Some(DISPATCH_OWNER),
            worker.lease,
            now_ms(),
        )
        .await;
    let record = match claim {
        Ok(ClaimOutcome::Claimed(record)) => record,
        Ok(ClaimOutcome::Held { owner, expires_ms }) => {
            // Its holder finishes it, or dies and the reaper makes it Ready.
            tracing::debug!(%owner, expires_ms, "held by another worker; dropping the duplicate");
            return Settle::Ack;
        }
        Ok(ClaimOutcome::NotClaimable(TaskState::Built)) if delivery_attempt > 1 => {
            return republish_built(worker, work).await;
        }
        Ok(ClaimOutcome::NotClaimable(state)) => {
            tracing::debug!(
                state = state.as_str(),
                "not claimable; dropping the message"
            );
            return Settle::Ack;
        }
        Err(e) => return store_failure("claiming the task", e),
    };
    run_claimed(worker, record, hard_stop).await
}

/// Builds a claimed task while keeping its lease, then records and announces
/// the outcome.
async fn run_claimed(worker: &Worker, record: TaskRecord, hard_stop: &CancellationToken) -> Settle {
    let store = &worker.connections.store;
    let lost = CancellationToken::new();
    let keeper = AbortOnDropHandle::new(tokio::spawn(keep_lease(
        store.clone(),
        record.plan_id.clone(),
        record.path.clone(),
        worker.instance.clone(),
        worker.lease,
        lost.clone(),
    )));
    let result = tokio::select! {
        r = build(worker, &record) => r,
        _ = lost.cancelled() => {
            tracing::warn!("lost the lease; another worker owns the task now");
            return Settle::Ack;
        }
        _ = hard_stop.cancelled() => return Settle::HandBack,
    };
    let (plan_id, path) = (&record.plan_id, &record.path);
    match result {
        Ok(built) => {
            // Concurrently: confirm we still hold the lease (a worker that
            // lost it must not record over the new owner), count the
            // outcome and cache a fresh result.
            let renew = store.renew(plan_id, path, &worker.instance, worker.lease, now_ms());
            let counter = if built.cache_hit {
                CACHE_HITS
            } else {
                CACHE_MISSES
            };
            // The global counter feeds /metrics; the per-plan one the
            // plan's final report.
            let count = async {
                store.incr(counter, 1).await?;
                store.incr(&format!("{counter}:{plan_id}"), 1).await
            };
            let cache = async {
                match &built.cache_key {
                    Some(key) => store.cache_put(key, &built.artifact).await,
                    None => Ok(()),
                }
            };
            match tokio::try_join!(renew, count, cache) {
                Ok((true, _, _)) => {}
                Ok((false, _, _)) => {
                    tracing::warn!("lost the lease before recording; dropping the result");
                    return Settle::Ack;
                }
                Err(e) => return store_failure("recording the outcome", e),
            }
            if let Err(e) = store.mark_built(plan_id, path, &built.artifact).await {
                return store_failure("recording the artifact", e);
            }
            drop(keeper);
            let duration_ms = u64::try_from(built.duration.as_millis()).unwrap_or(u64::MAX);
            let message = TaskBuilt {
                plan_id: plan_id.clone(),
                path: path.clone(),
                attempt: record.attempt,
                artifact: built.artifact,
                cache_hit: built.cache_hit,
                executor: built.executor.clone(),
                duration_ms,
            };
            if let Err(e) = worker
                .connections
                .publish(queues::TASK_BUILT, message)
                .await
            {
                // The redelivery finds the task Built and announces it again.
                return Settle::Retry(format!("publishing task.built: {e:#}"));
            }
            tracing::info!(cache_hit = built.cache_hit, duration_ms, "task built");
            worker
                .metrics
                .emit(BuildTiming {
                    plan_id: plan_id.clone(),
                    path: path.clone(),
                    duration_ms,
                    cache_hit: built.cache_hit,
                    executor: built.executor,
                    instance: worker.instance.clone(),
                })
                .await;
            Settle::Ack
        }
        Err(BuildError::Exec(error)) => {
            tracing::warn!(error = %error.message, retryable = error.retryable, "task failed");
            let message = TaskFailed {
                plan_id: plan_id.clone(),
                path: path.clone(),
                attempt: record.attempt,
                stage: Stage::Dev,
                error: error.message.clone(),
                retryable: error.retryable,
            };
            if let Err(e) = worker
                .connections
                .publish(queues::TASK_FAILED, message)
                .await
            {
                return Settle::Retry(format!("publishing task.failed: {e:#}"));
            }
            worker
                .metrics
                .emit(BuildFailure {
                    plan_id: plan_id.clone(),
                    path: path.clone(),
                    error: error.message,
                    retryable: error.retryable,
                    instance: worker.instance.clone(),
                })
                .await;
            Settle::Ack
        }
        Err(BuildError::Store(e)) => store_failure("building the task", e),
    }
}

/// Announces `task.built` again for a task some worker built but (maybe)
/// never announced.
async fn republish_built(worker: &Worker, work: &TaskWork) -> Settle {
    let record = match worker
        .connections
        .store
        .task(&work.plan_id, &work.path)
        .await
    {
        Ok(Some(r)) => r,
        Ok(None) => return Settle::Ack,
        Err(e) => return store_failure("reading the built task", e),
    };
    let (TaskState::Built, Some(artifact)) = (record.state, record.artifact) else {
        return Settle::Ack;
    };
    tracing::info!("redelivered message for a built task; announcing task.built again");
    let message = TaskBuilt {
        plan_id: record.plan_id,
        path: record.path,
        attempt: record.attempt,
        artifact,
        cache_hit: false,
        executor: "(re-announced)".to_owned(),
        duration_ms: 0,
    };
    match worker
        .connections
        .publish(queues::TASK_BUILT, message)
        .await
    {
        Ok(()) => Settle::Ack,
        Err(e) => Settle::Retry(format!("publishing task.built: {e:#}")),
    }
}

/// Renews the lease every third of its length until dropped; cancels `lost`
/// when the store says the lease is gone. Failed renewals are retried at
/// the next period (the lease may still be valid).
async fn keep_lease(
    store: devfleet_store::SharedStore,
    plan_id: String,
    path: String,
    owner: String,
    lease: Duration,
    lost: CancellationToken,
) {
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match store.renew(&plan_id, &path, &owner, lease, now_ms()).await {
            Ok(true) => {}
            Ok(false) => {
                lost.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "renewing the lease failed; retrying"),
        }
    }
}

/// A built file.
struct Built {
    artifact: String,
    cache_hit: bool,
    /// Where to cache the artifact (a fresh result with the cache on).
    cache_key: Option<String>,
    executor: String,
    duration: Duration,
}

enum BuildError {
    /// The executor (or the task's inputs) failed: publish `task.failed`.
    Exec(ExecError),
    /// The store failed: retry the message.
    Store(StoreError),
}

impl From<StoreError> for BuildError {
    fn from(e: StoreError) -> Self {
        BuildError::Store(e)
    }
}

/// Looks the task up in the cache, else runs its executor and stores the
/// result (the caller caches it once it knows it still holds the lease).
async fn build(worker: &Worker, record: &TaskRecord) -> Result<Built, BuildError> {
    let started = Instant::now();
    let store = &worker.connections.store;
    let (_, executor) = worker
        .executors
        .resolve(record.executor.as_deref())
        .map_err(BuildError::Exec)?;
    let identity = executor.identity();
    let dependencies = dependency_artifacts(worker, record).await?;
    let is_fix = record.class == TaskClass::Fix;
    let key = cache_key(&CacheKeyInput {
        salt: &worker.cache_salt,
        executor: &identity,
        path: &record.path,
        spec: &record.spec,
        content: record.content.as_deref(),
        dependencies: &dependencies,
        fix: is_fix.then(|| {
            (
                record.error.as_deref().unwrap_or(""),
                record.artifact.as_deref(),
            )
        }),
    });
    if worker.cache {
        if let Some(artifact) = store.cache_get(&key).await? {
            tracing::debug!(%artifact, "cache hit");
            return Ok(Built {
                artifact,
                cache_hit: true,
                cache_key: None,
                executor: identity,
                duration: started.elapsed(),
            });
        }
    }
    let input = exec_input(worker, record, &dependencies).await?;
    let text = match tokio::time::timeout(worker.exec_timeout, executor.run(&input)).await {
        Ok(result) => result.map_err(BuildError::Exec)?,
        Err(_) => {
            return Err(BuildError::Exec(ExecError::retryable(format!(
                "the {identity} executor timed out after {:?}",
                worker.exec_timeout
            ))))
        }
    };
    let artifact = store.put_artifact(text.as_bytes()).await?;
    Ok(Built {
        artifact,
        cache_hit: false,
        cache_key: worker.cache.then_some(key),
        executor: identity,
        duration: started.elapsed(),
    })
}

/// `(path, artifact hash)` of every direct dependency, sorted by path.
async fn dependency_artifacts(
    worker: &Worker,
    record: &TaskRecord,
) -> Result<Vec<(String, String)>, BuildError> {
    let store = &worker.connections.store;
    let mut paths = record.depends_on.clone();
    paths.sort();
    paths.dedup();
    let lookups = paths.iter().map(|p| store.task(&record.plan_id, p));
    let found = futures::future::try_join_all(lookups).await?;
    let mut out = Vec::with_capacity(paths.len());
    for (path, task) in paths.into_iter().zip(found) {
        let artifact = match task {
            Some(TaskRecord {
                artifact: Some(a), ..
            }) => a,
            Some(t) => {
                return Err(BuildError::Exec(ExecError::fatal(format!(
                    "dependency '{path}' has no artifact (it is {})",
                    t.state.as_str()
                ))))
            }
            None => {
                return Err(BuildError::Exec(ExecError::fatal(format!(
                    "dependency '{path}' is not in the plan"
                ))))
            }
        };
        out.push((path, artifact));
    }
    Ok(out)
}

/// The executor's input: the task, its dependencies' text and, for a fix or
/// retry, the diagnostics and the previous file.
async fn exec_input(
    worker: &Worker,
    record: &TaskRecord,
    dependencies: &[(String, String)],
) -> Result<ExecInput, BuildError> {
    let store = &worker.connections.store;
    let texts =
        futures::future::try_join_all(dependencies.iter().map(|(_, a)| store.artifact(a))).await?;
    let mut deps = BTreeMap::new();
    for ((path, artifact), bytes) in dependencies.iter().zip(texts) {
        let Some(bytes) = bytes else {
            return Err(BuildError::Exec(ExecError::fatal(format!(
                "the artifact {artifact} of dependency '{path}' is missing from the store"
            ))));
        };
        deps.insert(path.clone(), String::from_utf8_lossy(&bytes).into_owned());
    }
    let again = record.class == TaskClass::Fix || record.attempt > 1;
    let previous = match (&record.artifact, again) {
        (Some(a), true) => store
            .artifact(a)
            .await?
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
        _ => None,
    };
    Ok(ExecInput {
        plan_id: record.plan_id.clone(),
        path: record.path.clone(),
        spec: record.spec.clone(),
        content: record.content.clone(),
        estimate: record.estimate,
        attempt: record.attempt.max(1),
        class: record.class,
        diagnostics: if again { record.error.clone() } else { None },
        previous,
        dependencies: deps,
    })
}
