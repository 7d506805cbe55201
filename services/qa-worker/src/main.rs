//! The `qa-worker` binary: configuration from flags and environment, then
//! [`devfleet_qa_worker::run`].

use clap::Parser;
use devfleet_qa_worker::settings::Settings;
use devfleet_runtime::ConnectArgs;

/// devfleet qa-worker: sandboxed per-language checks and integration-test shards.
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
        "qa-worker",
        &args.connect,
        |connections, shutdown| async move {
            devfleet_qa_worker::run(args.settings.into_config(connections)?, shutdown).await
        },
    )
}
