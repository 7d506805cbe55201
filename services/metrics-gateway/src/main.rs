//! The `metrics-gateway` binary: configuration from flags and environment, then
//! [`devfleet_metrics_gateway::run`].

use clap::Parser;
use devfleet_metrics_gateway::Settings;
use devfleet_runtime::ConnectArgs;

/// devfleet metrics-gateway: metrics over WebSocket, Prometheus /metrics and the live dashboard.
#[derive(Parser)]
#[command(version)]
#[command(after_help = "Examples:
  metrics-gateway --addr 0.0.0.0:7070
  DEVFLEET_GATEWAY_TOKEN=s3cret metrics-gateway   # clients send Authorization: Bearer s3cret or ?token=s3cret")]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> anyhow::Result<()> {
    let args: Args = devfleet_runtime::settings::parse();
    devfleet_runtime::serve("metrics-gateway", &args.connect, |connections, shutdown| {
        devfleet_metrics_gateway::run(args.settings.into_config(connections), shutdown)
    })
}
