//! The qa-worker service: sandboxed per-language checks and integration shards.
//!
//! Not built yet: it arrives with issue #5. Until then [`run`] only
//! says so and waits for shutdown, so `devfleet up` and the stacks can
//! already start it.

use devfleet_runtime::Connections;
use tokio_util::sync::CancellationToken;

/// Settings of the qa-worker service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = &config.connections;
    tracing::warn!(service = "qa-worker", "not implemented yet (issue #5); idling until shutdown");
    shutdown.cancelled().await;
    Ok(())
}
