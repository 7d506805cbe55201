//! The `qa-worker` binary: configuration from flags and environment, then
//! [`devfleet_qa_worker::run`].

use clap::Parser;
use devfleet_runtime::ConnectArgs;

/// devfleet qa-worker: sandboxed per-language checks and integration shards.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    devfleet_runtime::serve("qa-worker", &args.connect, |connections, shutdown| {
        devfleet_qa_worker::run(devfleet_qa_worker::Config { connections }, shutdown)
    })
    .await
}
