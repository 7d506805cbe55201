//! The dev-worker service: writes files with an executor behind a result
//! cache.
//!
//! A dev-worker consumes `work.dev` with the runtime's consume loop
//! (read-ahead = its maximum slot count) and runs at most its current slot
//! count of tasks at once (resizable [`devfleet_runtime::consume::Slots`]).
//! For each message it:
//!
//! 1. claims the task in the store, taking the lease over from the
//!    dispatcher (`claim` with handoff). A task held by another live worker,
//!    or no longer claimable (done, built, failed), is a duplicate: the
//!    message is acked and dropped. The store decides who runs a task.
//! 2. renews the lease every third of its length while working; a worker
//!    that loses its lease abandons the task without publishing anything.
//! 3. computes the cache key ([`cache_key`]); a hit records the cached
//!    artifact without running the executor (counter `cache_hits`); a miss
//!    runs the executor ([`executor`]) under a timeout, stores the artifact
//!    and caches it (counter `cache_misses`).
//! 4. marks the task Built and publishes `task.built`, or publishes
//!    `task.failed` with the error and whether a retry can help;
//! 5. acks the message only after that publish was confirmed.
//!
//! Meanwhile it autoscales its slots ([`autoscale`]) and keeps its capacity
//! record in the store fresh (`heartbeat`) for the scheduler's dispatch
//! credit.
//!
//! # Guarantees
//!
//! * Never acks unfinished work: a message is acked after its outcome is
//!   published, or when the store says someone else owns the task.
//! * A worker killed at any point loses nothing: its unacked messages are
//!   redelivered, its leases expire and the scheduler's reaper makes the
//!   tasks Ready again; whoever claims next runs the task. A task built by
//!   a worker that died before publishing is re-announced by the redelivery.
//! * On shutdown it stops taking messages, hands back those waiting for a
//!   slot (unsettled, so the broker redelivers them), gives running tasks
//!   `shutdown_grace` to finish, then abandons the rest the same way.

use devfleet_contracts::capacity::WorkerCapacity;
use devfleet_protocol::ExecutorKind;
use devfleet_runtime::consume::Slots;
use devfleet_runtime::{Connections, Metrics};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub mod autoscale;
pub mod cache_key;
pub mod executor;
mod heartbeat;
pub mod settings;
mod work;
pub mod workspace;

pub use autoscale::ScalePolicy;
pub use executor::{ExecError, ExecInput, ExecOutput, Executor, Executors};
pub use settings::Settings;

/// Store counter: tasks answered from the result cache.
pub const CACHE_HITS: &str = "cache_hits";
/// Store counter: tasks the executor had to run.
pub const CACHE_MISSES: &str = "cache_misses";

/// Settings of the dev-worker service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
    /// Lease owner and metrics source; must be unique among live workers.
    pub instance: String,
    /// The executors this worker can run and its default.
    pub executors: Executors,
    /// Slot bounds and autoscaling hysteresis.
    pub scale: ScalePolicy,
    /// Lease on a claimed task; renewed every third of it.
    pub lease: Duration,
    /// Longest one executor run may take.
    pub exec_timeout: Duration,
    /// How long running tasks may finish after shutdown was requested.
    pub shutdown_grace: Duration,
    /// Lifetime of the capacity record (refreshed every third of it).
    pub heartbeat_ttl: Duration,
    /// Use the result cache.
    pub cache: bool,
    /// Mixed into every cache key: change it to stop reusing results.
    pub cache_salt: String,
    /// The budget of a plan that sets none (unlimited by default).
    pub default_budget: devfleet_store::BudgetLimits,
    /// The cost limit as configured, for validation.
    pub default_max_cost_usd: Option<f64>,
    /// Where task workspaces (`workspaces/`) and materialised base
    /// snapshots (`snapshots/`) live.
    pub work_dir: std::path::PathBuf,
    /// Base snapshots kept materialised in `work_dir` (least recently
    /// used evicted).
    pub snapshot_cache_keep: usize,
    /// Operator labels announced as capabilities (`DEVFLEET_DEV_LABELS`).
    pub labels: Vec<String>,
    /// Probe programs on PATH at start and announce them (tests that
    /// want a fixed set of capabilities turn it off).
    pub probe: bool,
}

impl Config {
    /// Defaults that work on loopback (those of [`Settings`]: builtin
    /// executor by default, 2..10 slots, 30 s leases). Reads no
    /// environment, not even the OpenAI key.
    pub fn new(connections: Connections) -> Self {
        let settings = Settings::default();
        // The default executors (builtin, simulate) need nothing that
        // could fail; fall back to builtin alone all the same.
        let executors = settings
            .executors
            .build_with_key(None)
            .unwrap_or_else(|_| Executors::new(ExecutorKind::Builtin));
        settings.config(connections, executors)
    }

    /// Checks the settings; errors name the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.scale.min >= 1 && self.scale.min <= self.scale.max,
            "--min-slots (DEVFLEET_DEV_MIN_SLOTS) must be at least 1 and at most --max-slots \
             (DEVFLEET_DEV_MAX_SLOTS); got {}..{}",
            self.scale.min,
            self.scale.max
        );
        anyhow::ensure!(
            self.scale.max <= u32::from(u16::MAX),
            "--max-slots (DEVFLEET_DEV_MAX_SLOTS) is too large"
        );
        anyhow::ensure!(
            self.lease >= Duration::from_millis(30),
            "--lease-seconds (DEVFLEET_DEV_LEASE_SECONDS) must be at least 0.03"
        );
        anyhow::ensure!(
            !self.exec_timeout.is_zero(),
            "--exec-timeout-seconds (DEVFLEET_DEV_EXEC_TIMEOUT_SECONDS) must be positive"
        );
        anyhow::ensure!(
            self.heartbeat_ttl >= Duration::from_millis(30) && !self.scale.tick.is_zero(),
            "--heartbeat-ttl-seconds (DEVFLEET_DEV_HEARTBEAT_TTL_SECONDS) must be at least 0.03 \
             and --scale-tick-seconds (DEVFLEET_DEV_SCALE_TICK_SECONDS) positive"
        );
        anyhow::ensure!(
            self.default_max_cost_usd
                .is_none_or(|c| c.is_finite() && c > 0.0),
            "--default-max-cost-usd (DEVFLEET_DEV_DEFAULT_MAX_COST_USD) must be a positive number \
             of US dollars"
        );
        anyhow::ensure!(
            !self.instance.is_empty(),
            "the instance name must not be empty"
        );
        devfleet_runtime::capabilities::labels(&self.labels, "DEVFLEET_DEV_LABELS")?;
        Ok(())
    }
}

/// `dev-worker@host-pid-xxxxxx`: unique even for several workers in one
/// process, because lease ownership is by instance name.
pub fn unique_instance() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{}-{}",
        devfleet_runtime::instance_name("dev-worker"),
        &id[..6]
    )
}

/// What the parts of a running worker share.
pub(crate) struct Worker {
    pub connections: Connections,
    pub instance: String,
    pub executors: Executors,
    pub metrics: Metrics,
    /// Task slots (busy, and deliveries held waiting for one); the
    /// autoscaler resizes them, the consume loop runs tasks in them.
    pub slots: Arc<Slots>,
    /// Shutting down: advertise no free slot.
    pub draining: AtomicBool,
    /// Slots, busy or waiting changed: refresh the heartbeat.
    pub capacity_changed: Arc<Notify>,
    /// Tasks running in this process, to drop a duplicate delivery at once.
    running: Mutex<HashSet<(String, String)>>,
    pub scale: ScalePolicy,
    pub lease: Duration,
    pub exec_timeout: Duration,
    pub heartbeat_ttl: Duration,
    pub cache: bool,
    pub cache_salt: String,
    pub default_budget: devfleet_store::BudgetLimits,
    /// Materialised base snapshots.
    pub snapshots: devfleet_store::snapshot::SnapshotCache,
    /// Where task workspaces are made.
    pub workspaces: std::path::PathBuf,
    /// What this worker announces it can run, sorted.
    pub capabilities: Vec<String>,
}

impl Worker {
    fn new(config: &Config, capabilities: Vec<String>) -> Self {
        let capacity_changed = Arc::new(Notify::new());
        Self {
            connections: config.connections.clone(),
            instance: config.instance.clone(),
            executors: config.executors.clone(),
            metrics: config.connections.metrics(config.instance.clone()),
            slots: Slots::observed(config.scale.min, capacity_changed.clone()),
            draining: AtomicBool::new(false),
            capacity_changed,
            running: Mutex::new(HashSet::new()),
            scale: config.scale,
            lease: config.lease,
            exec_timeout: config.exec_timeout,
            heartbeat_ttl: config.heartbeat_ttl,
            cache: config.cache,
            cache_salt: config.cache_salt.clone(),
            default_budget: config.default_budget,
            snapshots: devfleet_store::snapshot::SnapshotCache::new(
                workspace::snapshots_root(&config.work_dir),
                config.snapshot_cache_keep,
            ),
            workspaces: workspace::workspaces_root(&config.work_dir),
            capabilities,
        }
    }

    /// The capacity record as of now.
    pub(crate) fn capacity_now(&self, now_ms: i64) -> WorkerCapacity {
        let counts = self.slots.snapshot();
        let busy = counts.busy;
        let slots = if self.draining.load(Ordering::Relaxed) {
            busy
        } else {
            counts.capacity
        };
        let ttl = i64::try_from(self.heartbeat_ttl.as_millis()).unwrap_or(i64::MAX);
        WorkerCapacity {
            slots,
            busy,
            waiting: counts.waiting,
            at_ms: now_ms,
            expires_ms: now_ms.saturating_add(ttl),
            capabilities: self.capabilities.clone(),
        }
    }

    /// Marks a task as running here; `false` if it already is.
    pub(crate) fn start_running(&self, plan_id: &str, path: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((plan_id.to_owned(), path.to_owned()))
    }

    pub(crate) fn stop_running(&self, plan_id: &str, path: &str) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(plan_id.to_owned(), path.to_owned()));
    }
}

/// What this worker announces: its executors (`executor:KIND`), the
/// programs and Python modules found on PATH (when `config.probe`), and
/// the operator's labels; sorted, without duplicates.
async fn capabilities(config: &Config) -> anyhow::Result<Vec<String>> {
    let mut caps = devfleet_runtime::capabilities::labels(&config.labels, "DEVFLEET_DEV_LABELS")?;
    caps.extend(
        config
            .executors
            .kinds()
            .map(|k| devfleet_contracts::capabilities::executor(k.as_str())),
    );
    if config.probe {
        let found =
            tokio::task::spawn_blocking(devfleet_runtime::capabilities::probe_this_host).await?;
        caps.extend(found);
    }
    Ok(caps.into_iter().collect())
}

/// Runs the service until `shutdown` is cancelled, then drains (see the
/// crate docs) and returns. Errors only if the bus is closed under it.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let capabilities = capabilities(&config).await?;
    let worker = Arc::new(Worker::new(&config, capabilities));
    tracing::info!(
        instance = %worker.instance,
        namespace = %worker.connections.namespace,
        min_slots = config.scale.min,
        max_slots = config.scale.max,
        executor = config.executors.default_kind().as_str(),
        capabilities = %worker.capabilities.join(","),
        "dev-worker starting"
    );
    let background = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat::run(worker.clone(), background.clone()));
    let scaler = tokio::spawn(autoscale::run(worker.clone(), background.clone()));
    // Drain: from the shutdown request on, advertise no free slot. The
    // consume loop hands back what waits for a slot, lets running tasks
    // finish within the grace period, then abandons the rest.
    let drain = tokio::spawn({
        let worker = worker.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            worker.draining.store(true, Ordering::Relaxed);
            worker.capacity_changed.notify_one();
        }
    });
    let result = work::consume(worker.clone(), shutdown, config.shutdown_grace).await;
    drain.abort();
    worker.draining.store(true, Ordering::Relaxed);
    background.cancel();
    let _ = heartbeat.await;
    let _ = scaler.await;
    tracing::info!(instance = %worker.instance, "dev-worker stopped");
    result
}
