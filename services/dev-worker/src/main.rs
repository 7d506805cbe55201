//! The `dev-worker` binary: configuration from flags and environment, then
//! [`devfleet_dev_worker::run`].

use clap::Parser;
use devfleet_runtime::ConnectArgs;

/// devfleet dev-worker: writes files with an executor behind a result cache.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    devfleet_runtime::serve("dev-worker", &args.connect, |connections, shutdown| {
        devfleet_dev_worker::run(devfleet_dev_worker::Config { connections }, shutdown)
    })
    .await
}
