//! The qa-worker service: checks each built file in a sandbox, and runs
//! integration-test shards.
//!
//! # QA (`work.qa` → `qa.results`)
//!
//! For each [`QaWork`](devfleet_protocol::QaWork) (`qa`): the file's artifact and the artifacts of every task
//! it depends on (transitively) are written to a temporary workspace
//! ([`workspace`]); the checks configured for its extension ([`checks`])
//! run one after another in the sandbox ([`sandbox`]); the verdict, every
//! check's status and output, and trimmed diagnostics of the failing ones
//! are published as a [`QaResult`](devfleet_protocol::QaResult). A check whose program is missing is
//! recorded `skipped` with the reason; a file no check applies to gets one
//! `skipped` check named `none`. When the checks cannot run at all (an
//! artifact is missing, the sandbox cannot start) the worker publishes
//! `task.failed` with stage `qa` instead, which the router retries and
//! counts against the QA circuit breaker.
//!
//! # Integration (`work.integration` → `integration.results`)
//!
//! For each [`IntegrationWork`](devfleet_protocol::IntegrationWork) shard (`shard`): the whole plan's files are written
//! to a workspace and the step's command runs there, sandboxed, split per
//! [`integration`]'s rules; the outcome is an
//! [`IntegrationResult`](devfleet_protocol::IntegrationResult).
//!
//! # Guarantees
//!
//! * A delivery is acked only after its result is confirmed by the broker;
//!   on shutdown no new work is taken, running checks get the shutdown
//!   grace to finish, and those still running then are killed and their
//!   deliveries handed back (unsettled, never reported passed or failed)
//!   for another worker.
//! * Checks never run unsandboxed unless the operator allowed it
//!   ([`sandbox`], "Failing closed").
//! * Up to `concurrency` checks or shards run at once (both queues' consume
//!   loops share one set of slots), each on its own slot (with its own
//!   sandbox uid when running as root).
//! * A stale request (the task moved on) is acked without a result; store
//!   and publish errors settle by the runtime's table
//!   ([`devfleet_runtime::consume`]).
//!
//! # Layout
//!
//! `config` (settings), `slots` (sandbox slot numbers), `qa` (the QA
//! handler and its checks), `shard` (the integration shard handler),
//! [`checks`], [`sandbox`], [`workspace`], [`integration`].

use devfleet_bus::ConsumeOptions;
use devfleet_protocol::metrics::SandboxHealth;
use devfleet_protocol::queues;
use devfleet_runtime::consume::{Consume, Slots};
use devfleet_runtime::{Connections, Metrics};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long a QA or integration delivery a worker holds stays unsettled
/// before NATS gives it to another worker, were this one to die: the
/// consume loop extends it every third of this while the work runs.
const QA_ACK_WAIT: Duration = Duration::from_secs(30);

pub mod checks;
mod config;
pub mod integration;
mod qa;
pub mod sandbox;
pub mod settings;
mod shard;
mod slots;
pub mod workspace;

pub use checks::CheckSpec;
pub use config::Config;
pub use sandbox::{Limits, Sandbox, SandboxMode, SandboxSettings, Unavailable};

/// What every part of a running worker shares.
struct Worker {
    connections: Connections,
    metrics: Metrics,
    checks: Vec<CheckSpec>,
    sandbox: Sandbox,
    check_timeout: Duration,
    integration_timeout: Duration,
    work_dir: PathBuf,
    diagnostics_bytes: usize,
    /// On RabbitMQ, work running this long settles its delivery early.
    settle_after: Duration,
    /// Sandbox slot numbers (each maps to a sandbox uid).
    slots: slots::SlotPool,
}

/// Runs the service until `shutdown` is cancelled. Checks still running
/// then get [`Config::shutdown_grace`] to finish; those that do not are
/// killed and their deliveries handed back. Fails at start when the
/// sandbox cannot start ([`sandbox::Unavailable`]) and unsandboxed runs are
/// not allowed.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    std::fs::create_dir_all(&config.work_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the work dir {} (DEVFLEET_QA_WORK_DIR): {e}",
            config.work_dir.display()
        )
    })?;
    let n = config.concurrency;
    let sandbox = Sandbox::detect(config.sandbox.clone(), n).await?;
    let worker = Arc::new(Worker {
        metrics: config.connections.metrics(config.instance.clone()),
        connections: config.connections.clone(),
        checks: config.checks.clone(),
        sandbox,
        check_timeout: config.check_timeout,
        integration_timeout: config.integration_timeout,
        work_dir: config.work_dir.clone(),
        diagnostics_bytes: config.diagnostics_bytes,
        settle_after: config.settle_after,
        slots: slots::SlotPool::new(n as u32),
    });
    tracing::info!(
        instance = %config.instance,
        isolation = worker.sandbox.isolation(),
        concurrency = n,
        "qa-worker starting"
    );
    // Both queues share the slots: `n` checks or shards at once in all.
    let slots = Slots::new(u32::try_from(n).unwrap_or(u32::MAX));
    let mut parts = JoinSet::new();
    let options = ConsumeOptions::default()
        .max_attempts(config.max_handler_attempts)
        // Short: the consume loop extends a delivery (NATS in-progress
        // acks) while its check or shard runs, so `ack_wait` need not cover
        // the longest work; it is how soon what a killed worker held comes
        // back.
        .ack_wait(QA_ACK_WAIT);
    // On shutdown no new work is taken; running checks get the grace
    // period to finish and settle, then are killed and their deliveries
    // handed back, for another worker. The shutdown token never reaches a
    // check itself.
    let consume = |queue: &str| {
        Consume::new(config.connections.clone(), queue)
            .options(options.clone())
            .slots(slots.clone())
            .grace(config.shutdown_grace)
    };
    parts.spawn(consume(queues::WORK_QA).run(worker.clone(), shutdown.clone(), qa::handle_qa));
    parts.spawn(consume(queues::WORK_INTEGRATION).run(
        worker.clone(),
        shutdown.clone(),
        shard::handle_integration,
    ));
    parts.spawn(report_health(worker.clone(), n, shutdown.clone()));
    let mut result = Ok(());
    while let Some(joined) = parts.join_next().await {
        let outcome = joined
            .map_err(|e| anyhow::anyhow!("a qa-worker task panicked: {e}"))
            .and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %e, "qa-worker part failed; stopping");
            if result.is_ok() {
                result = Err(e);
            }
            shutdown.cancel();
        }
    }
    tracing::info!("qa-worker stopped");
    result
}

/// Reports the sandbox in use (loudly when there is none) now and then.
async fn report_health(
    worker: Arc<Worker>,
    slots: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let isolation = worker.sandbox.isolation();
        worker
            .metrics
            .emit(SandboxHealth {
                isolation: isolation.to_owned(),
                healthy: isolation != "none",
                warning: (isolation == "none").then(|| {
                    "QA checks run without filesystem or network isolation \
                     (DEVFLEET_QA_ALLOW_UNSANDBOXED=true: the sandbox could not start)"
                        .to_owned()
                }),
                slots: slots as u64,
            })
            .await;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}
