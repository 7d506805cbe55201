//! The `analyzer` binary: configuration from flags and environment, then
//! [`devfleet_analyzer::service::run`].

use clap::Parser;
use devfleet_analyzer::settings::Settings;
use devfleet_runtime::ConnectArgs;

/// devfleet analyzer: turns submitted plans into dependency DAGs.
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
    devfleet_runtime::serve("analyzer", &args.connect, |connections, shutdown| {
        devfleet_analyzer::service::run(args.settings.into_config(connections), shutdown)
    })
}
