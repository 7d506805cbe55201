//! The `dev-worker` binary: configuration from flags and environment, then
//! [`devfleet_dev_worker::run`].

use clap::Parser;
use devfleet_dev_worker::Settings;
use devfleet_runtime::ConnectArgs;

/// devfleet dev-worker: writes files with an executor behind a result cache.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    devfleet_runtime::serve(
        "dev-worker",
        &args.connect,
        |connections, shutdown| async move {
            let config = args.settings.into_config(connections)?;
            devfleet_dev_worker::run(config, shutdown).await
        },
    )
    .await
}
