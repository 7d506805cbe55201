//! The `metrics-gateway` binary: configuration from flags and environment, then
//! [`devfleet_metrics_gateway::run`].

use clap::Parser;
use devfleet_runtime::ConnectArgs;

/// devfleet metrics-gateway: metrics over WebSocket, Prometheus /metrics and the live dashboard.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    devfleet_runtime::serve("metrics-gateway", &args.connect, |connections, shutdown| {
        devfleet_metrics_gateway::run(devfleet_metrics_gateway::Config { connections }, shutdown)
    })
    .await
}
