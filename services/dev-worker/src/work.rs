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
//! | usage or artifact not recordable        | retry with backoff                 |
//! | plan budget exhausted: task handed back, plan `budget_exhausted` | ack |
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

use crate::cache_key::{cache_key, CacheKeyInput, Dependency};
use crate::executor::{ExecError, ExecInput};
use crate::workspace::{self, Workspace};
use crate::{Worker, CACHE_HITS, CACHE_MISSES};
use devfleet_bus::ConsumeOptions;
use devfleet_contracts::capacity::DISPATCH_OWNER;
use devfleet_protocol::metrics::{BuildFailure, BuildTiming};
use devfleet_protocol::PlanAnalyzed;
use devfleet_protocol::{
    queues, Envelope, Message, PlanStatus, Stage, TaskBuilt, TaskClass, TaskFailed, TaskWork, Usage,
};
use devfleet_runtime::consume::{self, Consume, Inflight, Settlement};
use devfleet_store::{extra_files, snapshot};
use devfleet_store::{
    BudgetLimits, ClaimOutcome, Fence, Reservation, Spend, StoreError, TaskRecord, TaskState,
    UsageTotals,
};
use std::collections::{BTreeMap, BTreeSet};
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
            // Usage is spent whether or not this claim is still current, so
            // it is recorded before the fenced write; keyed by the attempt,
            // so a redelivered build of the same attempt counts once.
            // It also reconciles the run's budget reservation.
            if !built.cache_hit {
                if let Err(e) = store
                    .record_usage(plan_id, path, record.attempt, &built.usage)
                    .await
                {
                    return Settlement::from_store_error("recording the usage", e);
                }
            }
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
            // What this attempt changed besides its file replaces what an
            // earlier one did (a cache hit changed nothing else); a first
            // attempt without changes has nothing to replace.
            if !built.changes.is_empty() || record.attempt > 1 {
                if let Err(e) =
                    extra_files::record(store.as_ref(), plan_id, path, &built.changes).await
                {
                    return Settlement::from_store_error("recording the workspace changes", e);
                }
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
        Err(BuildError::Budget(message)) => {
            drop(keeper);
            hand_back(worker, &record, &fence, message).await
        }
        Err(BuildError::Exec(error)) => {
            // What the failed run used (a reply cut off at its length, an
            // agent that ran and failed) is spent: recorded like a
            // success's, which also releases the run's budget reservation.
            // Best effort: a reservation left over is released when the
            // lease ends.
            if let Err(e) = store
                .record_usage(plan_id, path, record.attempt, &error.usage)
                .await
            {
                tracing::warn!(error = %e, "cannot record the failed run's usage");
            }
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

/// The plan's budget cannot cover the task's next executor call: pause the
/// plan (`budget_exhausted`: the store hands out none of its work until its
/// status changes) and hand the task back to the ready set without running
/// it, neither failed nor dead-lettered. Set the status first, so the task
/// is not dispatched again in between.
async fn hand_back(
    worker: &Worker,
    record: &TaskRecord,
    fence: &Fence,
    message: String,
) -> Settlement {
    let store = &worker.connections.store;
    let (plan_id, path) = (&record.plan_id, &record.path);
    tracing::warn!(%message, "the plan's budget is exhausted; handing the task back");
    if let Err(e) = store
        .set_plan_status(plan_id, PlanStatus::BudgetExhausted, Some(message))
        .await
    {
        return Settlement::from_store_error("pausing the plan", e);
    }
    match store
        .requeue(plan_id, path, fence, record.class, record.error.clone())
        .await
    {
        Ok(()) => Settlement::Ack,
        Err(e) if e.is_stale() => Settlement::Ack,
        Err(e) => Settlement::from_store_error("handing the task back", e),
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
    /// What the executor's model calls used (empty for a cache hit).
    usage: Vec<Usage>,
    /// The judged changes to other paths of the workspace (empty for a
    /// cache hit: the cache holds the task's file only).
    changes: Vec<workspace::Decision>,
}

enum BuildError {
    /// The plan's budget cannot cover the call (the message says why):
    /// hand the task back and pause the plan.
    Budget(String),
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
    let context = TaskContext::load(worker, record).await?;
    // A task over a base builds differently when the base changes.
    let salt = match &context.base {
        Some(id) => format!("{}|base:{id}", worker.cache_salt),
        None => worker.cache_salt.clone(),
    };
    let is_fix = record.class == TaskClass::Fix;
    let key = cache_key(&CacheKeyInput {
        salt: &salt,
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
                usage: Vec::new(),
                changes: Vec::new(),
            });
        }
    }
    let mut input = exec_input(worker, record, &dependencies).await?;
    // Reserve the expected usage against the plan's budget; an executor
    // that cannot estimate reserves nothing (refused only once a limit is
    // reached).
    let expected = executor
        .estimate(&input)
        .map(|u| Spend::of(&UsageTotals::of(&u)))
        .unwrap_or_default();
    let reservation = store
        .reserve_budget(
            &record.plan_id,
            &record.path,
            record.attempt,
            expected,
            worker.default_budget,
        )
        .await?;
    if let Reservation::Exhausted {
        limits,
        spent,
        reserved,
    } = reservation
    {
        return Err(BuildError::Budget(exhausted_message(
            &record.plan_id,
            limits,
            spent,
            reserved,
            expected,
        )));
    }
    // The workspace holds every dependency, transitively (what
    // `exec_input` collected), and the extra files they wrote, over the
    // base.
    let mut files = dependency_extras(worker, record, &dependencies, &context.writers).await?;
    files.extend(input.dependencies.clone());
    input.base_files = context.imported.clone();
    let workspace = Workspace::prepare(
        store.as_ref(),
        &worker.snapshots,
        &worker.workspaces,
        context.base.as_deref(),
        &files,
    )
    .await?;
    input.workspace = Some(workspace.path().to_path_buf());
    let output = match tokio::time::timeout(worker.exec_timeout, executor.run(&input)).await {
        Ok(result) => result.map_err(BuildError::Exec)?,
        Err(_) => {
            return Err(BuildError::Exec(ExecError::retryable(format!(
                "the {identity} executor timed out after {:?}",
                worker.exec_timeout
            ))))
        }
    };
    let changes = workspace.changes(&output.other_files);
    let mut output = output;
    if output.text.is_empty() {
        // An agent that edits files in place returns no text: its file is
        // what it left at its path.
        match changes.iter().find(|c| c.path == record.path && !c.deleted) {
            Some(change) => output.text = change.text.clone().unwrap_or_default(),
            // Unchanged but present (a base file the agent judged right).
            None if workspace.path().join(&record.path).is_file() => {
                let bytes = std::fs::read(workspace.path().join(&record.path)).map_err(|e| {
                    BuildError::Exec(ExecError::retryable(format!(
                        "reading {} from the workspace: {e}",
                        record.path
                    )))
                })?;
                output.text = String::from_utf8_lossy(&bytes).into_owned();
            }
            None => {
                return Err(BuildError::Exec(ExecError::retryable(format!(
                "the {identity} executor returned no text and did not write {} in its workspace",
                record.path
            ))))
            }
        }
    }
    let rules = workspace::Rules::new(
        &record.path,
        &context.writes,
        context.base_files.clone(),
        context.task_paths.clone(),
    );
    let mut decisions = rules.judge(&changes);
    // Accepted files join the plan's tree: their text is stored now, the
    // decisions recorded once the result is (see `run_claimed`).
    for d in decisions.iter_mut().filter(|d| d.accepted && !d.deleted) {
        let text = changes
            .iter()
            .find(|c| c.path == d.path)
            .and_then(|c| c.text.as_deref())
            .unwrap_or_default();
        d.artifact = Some(store.put_artifact(text.as_bytes()).await?);
    }
    log_changes(&decisions);
    drop(workspace);
    let artifact = store.put_artifact(output.text.as_bytes()).await?;
    Ok(Built {
        artifact,
        cache_hit: false,
        cache_key: worker.cache.then_some(key),
        executor: identity,
        duration: started.elapsed(),
        usage: output.usage,
        changes: decisions,
    })
}

/// The plan's status message when its budget ran out: what was spent and
/// reserved against which limit, and how to raise it.
fn exhausted_message(
    plan_id: &str,
    limits: BudgetLimits,
    spent: Spend,
    reserved: Spend,
    next: Spend,
) -> String {
    let usd = |n: u64| n as f64 / 1e9;
    let mut parts = Vec::new();
    if let Some(max) = limits.max_tokens {
        parts.push(format!(
            "{} of {max} tokens spent ({} reserved by running work; the next call needs {})",
            spent.tokens, reserved.tokens, next.tokens
        ));
    }
    if let Some(max) = limits.max_cost_nusd {
        parts.push(format!(
            "${:.6} of ${:.6} spent (${:.6} reserved; the next call needs ${:.6})",
            usd(spent.cost_nusd),
            usd(max),
            usd(reserved.cost_nusd),
            usd(next.cost_nusd)
        ));
    }
    format!(
        "budget exhausted: {}; raise it with `devfleet budget {plan_id} --max-tokens N --max-cost-usd X`",
        parts.join(", ")
    )
}

/// What the plan says about a task beyond its record: the base snapshot,
/// its files, the task's `writes:` globs and every task's path.
struct TaskContext {
    base: Option<String>,
    base_files: BTreeSet<String>,
    /// The text of every base file the task imports (the analyzer's
    /// `base_imports`), for the `openai` executor's context.
    imported: BTreeMap<String, String>,
    writes: Vec<String>,
    task_paths: BTreeSet<String>,
    /// The tasks declaring `writes:` (only they can have extra files).
    writers: BTreeSet<String>,
}

impl TaskContext {
    /// Read from the plan record's detail (the analyzed plan) and the
    /// snapshot's manifest. A plan without detail has no base and no
    /// declared writes.
    async fn load(worker: &Worker, record: &TaskRecord) -> Result<Self, BuildError> {
        let store = &worker.connections.store;
        let plan = store.plan(&record.plan_id).await?;
        let analyzed = plan.and_then(|p| serde_json::from_str::<PlanAnalyzed>(&p.detail).ok());
        let Some(analyzed) = analyzed else {
            return Ok(Self {
                base: None,
                base_files: BTreeSet::new(),
                imported: BTreeMap::new(),
                writes: Vec::new(),
                task_paths: BTreeSet::new(),
                writers: BTreeSet::new(),
            });
        };
        let base = analyzed.plan.base_snapshot.clone();
        let manifest = match &base {
            Some(id) => match snapshot::load(store.as_ref(), id).await? {
                Some(manifest) => Some(manifest),
                None => {
                    return Err(BuildError::Exec(ExecError::fatal(format!(
                        "the plan's base snapshot {id} is not in the store"
                    ))))
                }
            },
            None => None,
        };
        let mut imported = BTreeMap::new();
        if let Some(manifest) = &manifest {
            let imports = analyzed
                .tasks
                .iter()
                .find(|t| t.path == record.path)
                .map(|t| t.base_imports.as_slice())
                .unwrap_or_default();
            for path in imports {
                if let Some(text) = snapshot::read_file(store.as_ref(), manifest, path).await? {
                    imported.insert(path.clone(), text);
                }
            }
        }
        let base_files = manifest
            .map(|m| m.files.into_keys().collect())
            .unwrap_or_default();
        let writes = analyzed
            .plan
            .tasks
            .iter()
            .find(|t| t.path == record.path)
            .map(|t| t.writes.clone())
            .unwrap_or_default();
        let writers = analyzed
            .plan
            .tasks
            .iter()
            .filter(|t| !t.writes.is_empty())
            .map(|t| t.path.clone())
            .collect();
        let task_paths = analyzed.plan.tasks.into_iter().map(|t| t.path).collect();
        Ok(Self {
            base,
            base_files,
            imported,
            writes,
            task_paths,
            writers,
        })
    }
}

/// Logs every judged workspace change (recorded for the plan's status,
/// report and tree once the result is, by [`extra_files::record`]).
fn log_changes(decisions: &[workspace::Decision]) {
    for d in decisions {
        if d.accepted {
            tracing::info!(path = %d.path, deleted = d.deleted, "workspace change accepted (declared in writes)");
        } else {
            tracing::warn!(path = %d.path, deleted = d.deleted, reason = %d.reason, "workspace change rejected");
        }
    }
}

/// Every dependency of the task, direct and transitive (breadth first
/// over `depends_on`, each at its shortest distance), with its artifact
/// hash, sorted by path. Each must have an artifact (it is Built or Done:
/// the task was dispatched only after its direct dependencies, and theirs
/// before them).
async fn dependency_artifacts(
    worker: &Worker,
    record: &TaskRecord,
) -> Result<Vec<Dependency>, BuildError> {
    let store = &worker.connections.store;
    let mut seen = std::collections::BTreeSet::from([record.path.clone()]);
    let mut frontier: Vec<String> = record.depends_on.clone();
    let mut out = Vec::new();
    let mut distance = 1;
    while !frontier.is_empty() {
        frontier.retain(|p| seen.insert(p.clone()));
        let lookups = frontier.iter().map(|p| store.task(&record.plan_id, p));
        let found = futures::future::try_join_all(lookups).await?;
        let mut next = Vec::new();
        for (path, task) in std::mem::take(&mut frontier).into_iter().zip(found) {
            let task = match task {
                Some(t) => t,
                None => {
                    return Err(BuildError::Exec(ExecError::fatal(format!(
                        "dependency '{path}' is not in the plan"
                    ))))
                }
            };
            let Some(artifact) = task.artifact else {
                return Err(BuildError::Exec(ExecError::fatal(format!(
                    "dependency '{path}' has no artifact (it is {})",
                    task.state.as_str()
                ))));
            };
            next.extend(task.depends_on);
            out.push(Dependency {
                path,
                artifact,
                distance,
            });
        }
        frontier = next;
        distance += 1;
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The accepted extra files (`writes:`) of the task's dependencies, by
/// path, as the plan's tree orders them (a dependent's version wins).
async fn dependency_extras(
    worker: &Worker,
    record: &TaskRecord,
    dependencies: &[Dependency],
    writers: &BTreeSet<String>,
) -> Result<BTreeMap<String, String>, BuildError> {
    let store = &worker.connections.store;
    // Only a task declaring `writes:` can have extra files.
    let lookups = dependencies
        .iter()
        .filter(|d| writers.contains(&d.path))
        .map(|d| store.task(&record.plan_id, &d.path));
    let records: Vec<TaskRecord> = futures::future::try_join_all(lookups)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let refs: Vec<&TaskRecord> = records.iter().collect();
    let mut out = BTreeMap::new();
    for (path, file) in extra_files::plan_tree(store.as_ref(), &refs, Some(writers)).await? {
        if file.task == path {
            continue;
        }
        let Some(bytes) = store.artifact(&file.artifact).await? else {
            return Err(BuildError::Exec(ExecError::fatal(format!(
                "the artifact {} of '{path}' (written by '{}') is missing from the store",
                file.artifact, file.task
            ))));
        };
        out.insert(path, String::from_utf8_lossy(&bytes).into_owned());
    }
    Ok(out)
}

/// The executor's input: the task, its dependencies' text (with their
/// distance) and, for a fix or
/// retry, the diagnostics and the previous file.
async fn exec_input(
    worker: &Worker,
    record: &TaskRecord,
    dependencies: &[Dependency],
) -> Result<ExecInput, BuildError> {
    let store = &worker.connections.store;
    let texts =
        futures::future::try_join_all(dependencies.iter().map(|d| store.artifact(&d.artifact)))
            .await?;
    let mut deps = BTreeMap::new();
    let mut distance = BTreeMap::new();
    for (dependency, bytes) in dependencies.iter().zip(texts) {
        let Dependency {
            path,
            artifact,
            distance: d,
        } = dependency;
        distance.insert(path.clone(), *d);
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
        dependency_distance: distance,
        base_files: BTreeMap::new(),
        workspace: None,
    })
}
