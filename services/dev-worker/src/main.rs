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

fn main() -> anyhow::Result<()> {
    let args: Args = devfleet_runtime::settings::parse();
    devfleet_runtime::serve(
        "dev-worker",
        &args.connect,
        |connections, shutdown| async move {
            devfleet_dev_worker::run(args.settings.into_config(connections)?, shutdown).await
        },
    )
}
