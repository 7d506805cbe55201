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
  DEVFLEET_GATEWAY_TOKEN=s3cret metrics-gateway   # clients send Authorization: Bearer s3cret or ?token=s3cret
  DEVFLEET_GATEWAY_TOKEN_FILE=/run/secrets/gateway-token metrics-gateway
  DEVFLEET_GATEWAY_ORIGINS=https://ops.example.com metrics-gateway --addr 0.0.0.0:7070

The token is read from DEVFLEET_GATEWAY_TOKEN or the file DEVFLEET_GATEWAY_TOKEN_FILE
names, never from a flag (flags show in `ps`).")]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> anyhow::Result<()> {
    let args: Args = devfleet_runtime::settings::parse();
    devfleet_runtime::serve(
        "metrics-gateway",
        &args.connect,
        |connections, shutdown| async {
            let config = args
                .settings
                .into_config(connections)
                .with_token_from_env()?;
            devfleet_metrics_gateway::run(config, shutdown).await
        },
    )
}
