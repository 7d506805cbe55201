//! The `scheduler` binary: configuration from flags and environment, then
//! [`devfleet_scheduler::run`].

use clap::Parser;
use devfleet_runtime::ConnectArgs;
use devfleet_scheduler::settings::Settings;

/// devfleet scheduler: keeps tasks in the priority store and dispatches each
/// the moment its dependencies are done.
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
    devfleet_runtime::serve("scheduler", &args.connect, |connections, shutdown| {
        devfleet_scheduler::run(args.settings.into_config(connections), shutdown)
    })
}
