//! The `canary` binary: configuration from flags and environment, then
//! [`devfleet_canary::run`].

use clap::Parser;
use devfleet_canary::settings::Settings;
use devfleet_runtime::ConnectArgs;

/// devfleet canary: progressive rollout with health checks and automatic rollback.
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
        "canary",
        &args.connect,
        |connections, shutdown| async move {
            devfleet_canary::run(args.settings.into_config(connections)?, shutdown).await
        },
    )
}
