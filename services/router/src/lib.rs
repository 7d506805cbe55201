//! The router service: routes built and failed tasks: QA, retries with backoff, dead letters, circuit breaker.
//!
//! Not built yet: it arrives with issue #5. Until then [`run`] only
//! says so and waits for shutdown, so `devfleet up` and the stacks can
//! already start it.

use devfleet_runtime::Connections;
use tokio_util::sync::CancellationToken;

/// Settings of the router service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = &config.connections;
    tracing::warn!(service = "router", "not implemented yet (issue #5); idling until shutdown");
    shutdown.cancelled().await;
    Ok(())
}
