//! The metrics-gateway service: metrics over WebSocket, Prometheus /metrics and the live dashboard.
//!
//! Not built yet: it arrives with issue #7. Until then [`run`] only
//! says so and waits for shutdown, so `devfleet up` and the stacks can
//! already start it.

use devfleet_runtime::Connections;
use tokio_util::sync::CancellationToken;

/// Settings of the metrics-gateway service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = &config.connections;
    tracing::warn!(service = "metrics-gateway", "not implemented yet (issue #7); idling until shutdown");
    shutdown.cancelled().await;
    Ok(())
}
