//! The `router` binary: configuration from flags and environment, then
//! [`devfleet_router::run`].

use clap::Parser;
use devfleet_runtime::ConnectArgs;

/// devfleet router: routes built and failed tasks: QA, retries with backoff, dead letters, circuit breaker.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    devfleet_runtime::serve("router", &args.connect, |connections, shutdown| {
        devfleet_router::run(devfleet_router::Config { connections }, shutdown)
    })
    .await
}
