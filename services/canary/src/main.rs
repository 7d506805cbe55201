//! The `canary` binary: configuration from flags and environment, then
//! [`devfleet_canary::run`].

use clap::Parser;
use devfleet_runtime::ConnectArgs;

/// devfleet canary: progressive rollout with health checks and automatic rollback.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    devfleet_runtime::serve("canary", &args.connect, |connections, shutdown| {
        devfleet_canary::run(devfleet_canary::Config { connections }, shutdown)
    })
    .await
}
