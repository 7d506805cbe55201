//! The `router` binary: configuration from flags and environment, then
//! [`devfleet_router::run`].

use clap::Parser;
use devfleet_router::settings::Settings;
use devfleet_runtime::ConnectArgs;

/// devfleet router: QA dispatch, retries with backoff, dead letters,
/// escalations and circuit breakers.
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
    devfleet_runtime::serve("router", &args.connect, |connections, shutdown| {
        devfleet_router::run(args.settings.into_config(connections), shutdown)
    })
}
