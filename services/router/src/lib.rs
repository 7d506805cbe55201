//! The router service: decides what happens to a task after each stage.
//!
//! # Routes
//!
//! | in | condition | out |
//! |---|---|---|
//! | `task.built` | QA breaker closed (or a probe permit) | `work.qa` ([`QaWork`](devfleet_protocol::QaWork)) |
//! | `task.built` | QA breaker open | parked in the store until it admits QA work again |
//! | `qa.results` | passed | `task.done` |
//! | `qa.results` | failed, failures < max | fix task: `store.requeue(.., Fix, diagnostics)` (fixes go first) |
//! | `task.failed` | retryable, failures < max | a retry after an exponential backoff with jitter ([`retry`]) |
//! | any failure | failures reach max, or not retryable | dead letter: task Failed (dependents Blocked), [`dlq`] entry with the full history, `escalation` event, and `task.finally_failed` ([`TaskFinallyFailed`](devfleet_protocol::TaskFinallyFailed)) to the scheduler, which alone ends plans |
//! | `devfleet.dlq` | a bus dead letter of this namespace | indexed in [`dlq`] |
//!
//! Failures are counted per task across retries and the fix loop
//! ([`history`]). Circuit breakers per stage ([`breaker`]) pause dispatch
//! when a stage fails too often: the router holds QA dispatch itself; the
//! scheduler reads the `dev` breaker from the store before dispatching.
//!
//! # Guarantees
//!
//! * At-least-once in, idempotent effects: a delivery is acked only after
//!   its effects (store transitions, published messages) are durable; a
//!   redelivery re-reads the task and finds the work done (stale messages
//!   are acked), and a failure is counted once per (attempt, stage).
//! * A retry waits at least its backoff delay, and the wait survives a
//!   router restart: the ticket waits in the broker (delayed redelivery on
//!   the router's own queue) and the task is held by a router lease that
//!   outlives the delay, so no scheduler dispatches it early.
//! * Any number of router replicas may run; breaker state is shared
//!   through the store.

use devfleet_runtime::{backoff::Backoff, Connections, Metrics};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub mod breaker;
pub mod dlq;
mod dlq_indexer;
pub mod history;
pub mod retry;
mod routes;
pub mod settings;

pub use breaker::BreakerSettings;
pub use routes::QA_PARKED;

/// The lease owner the router holds tasks as while their retry waits.
pub const ROUTER_OWNER: &str = "router";

/// Settings of the router service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
    /// Name of this replica in metrics, logs and breaker window records.
    pub instance: String,
    /// Delay before retrying a failed attempt: `base * factor^(n-1)` after
    /// the n-th failure, capped, with jitter.
    pub backoff: Backoff,
    /// The failure (counted across retries and fixes) that dead-letters a task.
    pub max_failures: u32,
    /// How much longer than the retry delay the router's hold on a task
    /// lasts; if every router is down that long, the scheduler's lease
    /// reaper makes the task ready again.
    pub retry_lease_grace: Duration,
    pub breaker: BreakerSettings,
    /// How often breaker timers and parked QA work are looked at.
    pub breaker_tick: Duration,
    /// Handlers in flight per consumed queue.
    pub handler_concurrency: usize,
    /// Deliveries of one message (transient failures) before it is
    /// dead-lettered.
    pub max_handler_attempts: u32,
    /// Index the bus dead-letter queue (`devfleet.dlq`) into the store.
    pub index_bus_dlq: bool,
}

impl Config {
    /// Defaults that work on loopback (those of [`settings::Settings`],
    /// no environment).
    pub fn new(connections: Connections) -> Self {
        settings::Settings::default().into_config(connections)
    }

    /// Checks the settings; errors name the flag.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_failures >= 1,
            "--max-failures (DEVFLEET_ROUTER_MAX_FAILURES) must be at least 1"
        );
        anyhow::ensure!(
            !self.backoff.base.is_zero() && self.backoff.cap >= self.backoff.base,
            "--retry-base-seconds (DEVFLEET_ROUTER_RETRY_BASE_SECONDS) must be positive and \
             --retry-cap-seconds (DEVFLEET_ROUTER_RETRY_CAP_SECONDS) at least as large"
        );
        anyhow::ensure!(
            self.backoff.factor >= 1.0,
            "--retry-factor (DEVFLEET_ROUTER_RETRY_FACTOR) must be at least 1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.backoff.jitter),
            "--retry-jitter (DEVFLEET_ROUTER_RETRY_JITTER) must be between 0 and 1"
        );
        anyhow::ensure!(
            !self.breaker_tick.is_zero(),
            "--breaker-tick-seconds (DEVFLEET_ROUTER_BREAKER_TICK_SECONDS) must be positive"
        );
        self.breaker.validate()
    }
}

/// What every part of the running router shares.
pub(crate) struct Router {
    pub connections: Connections,
    pub metrics: Metrics,
    pub backoff: Backoff,
    pub max_failures: u32,
    pub retry_lease_grace: Duration,
    pub breakers: breaker::Breakers,
}

/// Runs the service until `shutdown` is cancelled, then finishes the
/// handlers in flight and returns. If any part fails for good (the bus was
/// closed under it), the others are stopped and the error returned.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let router = Arc::new(Router {
        metrics: config.connections.metrics(config.instance.clone()),
        connections: config.connections.clone(),
        backoff: config.backoff,
        max_failures: config.max_failures,
        retry_lease_grace: config.retry_lease_grace,
        breakers: breaker::Breakers::new(
            config.connections.clone(),
            config.instance.clone(),
            config.breaker.clone(),
        ),
    });
    tracing::info!(
        instance = %config.instance,
        namespace = %config.connections.namespace,
        max_failures = config.max_failures,
        "router starting"
    );
    let stop = shutdown.child_token();
    let mut parts = JoinSet::new();
    routes::spawn(&mut parts, &router, &config, &stop);
    if config.index_bus_dlq {
        parts.spawn(dlq_indexer::run(router.clone(), stop.clone()));
    }
    parts.spawn(routes::tick(
        router.clone(),
        config.breaker_tick,
        stop.clone(),
    ));

    let mut result = Ok(());
    while let Some(joined) = parts.join_next().await {
        let outcome = joined
            .map_err(|e| anyhow::anyhow!("a router task panicked: {e}"))
            .and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %e, "router part failed; stopping");
            if result.is_ok() {
                result = Err(e);
            }
        }
        stop.cancel();
    }
    tracing::info!("router stopped");
    result
}
