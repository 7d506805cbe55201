//! One task from `work.dev`: claim, build, record, publish, settle.
//!
//! [`consume`] runs the runtime's consume loop on `work.dev`: it reads
//! ahead up to the maximum slot count, and each delivery waits for one of
//! the worker's slots and then runs [`handle`]. The store decides who runs
//! a task: a worker only builds what its `claim` returned as `Claimed`, and
//! acks (drops) a message for a task someone else holds or that is no
//! longer claimable. Store errors settle by the runtime's table
//! ([`devfleet_runtime::consume`]).
//!
//! | what happened                          | delivery                           |
//! |----------------------------------------|------------------------------------|
//! | built (or cache hit), `task.built` sent | ack                                |
//! | executor failed, `task.failed` sent     | ack                                |
//! | task held by another worker / final     | ack (duplicate)                    |
//! | lease lost while building               | ack, nothing published             |
//! | claim stale when recording (`StaleClaim`) | ack, nothing published           |
//! | store or broker unreachable             | retry with backoff                 |
//! | shutdown grace ran out                  | left unsettled → redelivered       |
//!
//! A redelivered message for a task already Built (its worker died between
//! recording the artifact and publishing) re-announces `task.built` (marked
//! `reannounced`: no executor ran), so the task is never stranded in Built.
//!
//! Every store write about the claim carries its [`Fence`] (owner and
//! attempt): a worker paused past its lease (SIGSTOP, a long GC, a frozen
//! VM) that wakes up after another worker took the task over gets
//! `StaleClaim` from the store and publishes nothing, so it can never
//! overwrite the newer attempt's artifact or state.
//!
//! Long tasks vs the broker's deadline: on NATS the consume loop extends
//! the delivery while the task runs. RabbitMQ's `consumer_timeout` cannot
//! be extended, so there the delivery is acked as soon as the claim is
//! durable ([`Inflight::guarded`]); from then on the lease is the only
//! guarantee: renewed while building, and when this worker dies it expires
//! and the scheduler's reaper makes the task Ready and dispatches it again.
//! (After that early ack a failure to announce a Built task is not retried
//! by a redelivery; the scheduler's watchdog re-announces stuck Built tasks.)

use crate::cache_key::{cache_key, CacheKeyInput};
use crate::executor::{ExecError, ExecInput};
use crate::{Worker, CACHE_HITS, CACHE_MISSES};
use devfleet_bus::ConsumeOptions;
use devfleet_contracts::capacity::DISPATCH_OWNER;
use devfleet_protocol::metrics::{BuildFailure, BuildTiming};
use devfleet_protocol::{
    queues, Envelope, Message, Stage, TaskBuilt, TaskClass, TaskFailed, TaskWork,
};
use devfleet_runtime::consume::{self, Consume, Inflight, Settlement};
use devfleet_store::{ClaimOutcome, Fence, StoreError, TaskRecord, TaskState};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

/// Deliveries of one message (transient failures) before it is
/// dead-lettered. The task itself is not lost then: its lease expires and
/// the scheduler dispatches it again.
const MAX_DELIVERIES: u32 = 20;

/// Consumes `work.dev` until `shutdown`, then hands back the deliveries
/// waiting for a slot, gives running tasks `grace` to finish and hands
/// back the rest unsettled. Errors only if the bus is closed under it.
pub(crate) async fn consume(
    worker: Arc<Worker>,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let options = ConsumeOptions::default()
        .max_attempts(MAX_DELIVERIES)
        .ack_wait(worker.exec_timeout + worker.lease);
    Consume::new(worker.connections.clone(), queues::WORK_DEV)
        .options(options)
        .slots(worker.slots.clone())
        .read_ahead(worker.scale.max)
        .grace(grace)
        .run(worker, shutdown, handle)
        .await
}

/// Marks a task running here until dropped (also when the shutdown grace
/// runs out and the handler is dropped).
struct Running<'a> {
    worker: &'a Worker,
    plan_id: &'a str,
    path: &'a str,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.worker.stop_running(self.plan_id, self.path);
    }
}

/// Handles one delivery, run in a slot by the consume loop.
async fn handle(worker: Arc<Worker>, envelope: Envelope, inflight: Inflight) -> Settlement {
    let Message::TaskWork(work) = envelope.message else {
        return consume::unexpected(&envelope, queues::WORK_DEV);
    };
    let span = tracing::info_span!(
        "dev_task",
        plan_id = %work.plan_id,
        path = %work.path,
        attempt = work.attempt,
        delivery_attempt = inflight.attempt(),
        instance = %worker.instance,
    );
    async {
        if !worker.start_running(&work.plan_id, &work.path) {
            tracing::debug!("already running here; dropping the duplicate");
            return Settlement::Ack;
        }
        let _running = Running {
            worker: &worker,
            plan_id: &work.plan_id,
            path: &work.path,
        };
        process(&worker, &work, &inflight).await
    }
    .instrument(span)
    .await
}

async fn process(worker: &Worker, work: &TaskWork, inflight: &Inflight) -> Settlement {
    let delivery_attempt = inflight.attempt();
    let store = &worker.connections.store;
    let claim = store
        .claim(
            &work.plan_id,
            &work.path,
            &worker.instance,
            Some(DISPATCH_OWNER),
            worker.lease,
        )
        .await;
    let record = match claim {
        Ok(ClaimOutcome::Claimed(record)) => record,
        Ok(ClaimOutcome::Held { owner, expires_ms }) => {
            // Its holder finishes it, or dies and the reaper makes it Ready.
            tracing::debug!(%owner, expires_ms, "held by another worker; dropping the duplicate");
            return Settlement::Ack;
        }
        Ok(ClaimOutcome::NotClaimable(TaskState::Built)) if delivery_attempt > 1 => {
            return republish_built(worker, work).await;
        }
        Ok(ClaimOutcome::NotClaimable(state)) => {
            tracing::debug!(
                state = state.as_str(),
                "not claimable; dropping the message"
            );
            return Settlement::Ack;
        }
        Err(e) => return Settlement::from_store_error("claiming the task", e),
    };
    // The lease guards the task from here on (see the module docs).
    inflight.guarded().await;
    run_claimed(worker, record).await
}

/// Builds a claimed task while keeping its lease, then records and announces
/// the outcome.
async fn run_claimed(worker: &Worker, record: TaskRecord) -> Settlement {
    let store = &worker.connections.store;
    let fence = Fence::of(&record);
    let lost = CancellationToken::new();
    let keeper = AbortOnDropHandle::new(tokio::spawn(keep_lease(
        store.clone(),
        record.plan_id.clone(),
        record.path.clone(),
        fence.clone(),
        worker.lease,
        lost.clone(),
    )));
    let result = tokio::select! {
        r = build(worker, &record) => r,
        _ = lost.cancelled() => {
            tracing::warn!("lost the lease; another worker owns the task now");
            return Settlement::Ack;
        }
    };
    let (plan_id, path) = (&record.plan_id, &record.path);
    match result {
        Ok(built) => {
            // Fenced: a worker whose claim is over (paused past its lease,
            // the task taken over) records nothing and announces nothing.
            match store
                .mark_built(plan_id, path, &fence, &built.artifact)
                .await
            {
                Ok(()) => {}
                Err(e) if e.is_stale() => {
                    tracing::warn!(error = %e, "the claim is over; dropping the result");
                    return Settlement::Ack;
                }
                Err(e) => return Settlement::from_store_error("recording the artifact", e),
            }
            record_build(worker, plan_id, &built).await;
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
                reannounced: false,
            };
            if let Err(e) = worker
                .connections
                .publish(queues::TASK_BUILT, message)
                .await
            {
                // The redelivery finds the task Built and announces it again.
                return Settlement::from_publish_error("publishing task.built", e);
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
            Settlement::Ack
        }
        Err(BuildError::Exec(error)) => {
            // A worker whose claim is over does not report its failure: the
            // attempt is someone else's now.
            match store.renew(plan_id, path, &fence, worker.lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(error = %error.message, "the claim is over; dropping the failure");
                    return Settlement::Ack;
                }
                Err(e) => return Settlement::from_store_error("checking the claim", e),
            }
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
                return Settlement::from_publish_error("publishing task.failed", e);
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
            Settlement::Ack
        }
        Err(BuildError::Store(e)) => Settlement::from_store_error("building the task", e),
    }
}

/// Announces `task.built` again for a task some worker built but (maybe)
/// never announced.
async fn republish_built(worker: &Worker, work: &TaskWork) -> Settlement {
    let record = match worker
        .connections
        .store
        .task(&work.plan_id, &work.path)
        .await
    {
        Ok(Some(r)) => r,
        Ok(None) => return Settlement::Ack,
        Err(e) => return Settlement::from_store_error("reading the built task", e),
    };
    let (TaskState::Built, Some(artifact)) = (record.state, record.artifact) else {
        return Settlement::Ack;
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
        reannounced: true,
    };
    match worker
        .connections
        .publish(queues::TASK_BUILT, message)
        .await
    {
        Ok(()) => Settlement::Ack,
        Err(e) => Settlement::from_publish_error("publishing task.built", e),
    }
}

/// Renews the lease every third of its length until dropped; cancels `lost`
/// when the store says the lease is gone. Failed renewals are retried at
/// the next period (the lease may still be valid).
async fn keep_lease(
    store: devfleet_store::SharedStore,
    plan_id: String,
    path: String,
    fence: Fence,
    lease: Duration,
    lost: CancellationToken,
) {
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match store.renew(&plan_id, &path, &fence, lease).await {
            Ok(true) => {}
            Ok(false) => {
                lost.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "renewing the lease failed; retrying"),
        }
    }
}

/// Counts a recorded build (cache hit or miss, globally and per plan) and
/// caches a fresh result. Informational: a failure is logged, not retried
/// (the artifact is recorded already).
async fn record_build(worker: &Worker, plan_id: &str, built: &Built) {
    let store = &worker.connections.store;
    let counter = if built.cache_hit {
        CACHE_HITS
    } else {
        CACHE_MISSES
    };
    // The global counter feeds /metrics; the per-plan one the plan's
    // final report.
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
    if let Err(e) = tokio::try_join!(count, cache) {
        tracing::warn!(error = %e, "cannot count or cache the build");
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
    let output = match tokio::time::timeout(worker.exec_timeout, executor.run(&input)).await {
        Ok(result) => result.map_err(BuildError::Exec)?,
        Err(_) => {
            return Err(BuildError::Exec(ExecError::retryable(format!(
                "the {identity} executor timed out after {:?}",
                worker.exec_timeout
            ))))
        }
    };
    let artifact = store.put_artifact(output.text.as_bytes()).await?;
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
        workspace: None,
    })
}
