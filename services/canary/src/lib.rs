//! The canary service: progressive rollout with health checks and automatic rollback.
//!
//! Not built yet: it arrives with issue #6. Until then [`run`] only
//! says so and waits for shutdown, so `devfleet up` and the stacks can
//! already start it.

use devfleet_runtime::Connections;
use tokio_util::sync::CancellationToken;

/// Settings of the canary service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = &config.connections;
    tracing::warn!(service = "canary", "not implemented yet (issue #6); idling until shutdown");
    shutdown.cancelled().await;
    Ok(())
}
