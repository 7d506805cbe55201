//! The `analyzer` binary: configuration from flags and environment, then
//! [`devfleet_analyzer::service::run`].

use clap::Parser;
use devfleet_runtime::ConnectArgs;
use std::path::PathBuf;

/// devfleet analyzer: turns submitted plans into dependency DAGs.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Plans analysed at once.
    #[arg(long, env = "DEVFLEET_ANALYZER_CONCURRENCY", default_value_t = 2)]
    concurrency: u16,
    /// Directory against which plans' relative `base` paths are resolved.
    #[arg(long, env = "DEVFLEET_ANALYZER_WORKDIR")]
    workdir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    devfleet_runtime::serve("analyzer", &args.connect, |connections, shutdown| {
        let mut config = devfleet_analyzer::service::Config::new(connections);
        config.concurrency = args.concurrency.max(1);
        config.workdir = args.workdir.clone();
        devfleet_analyzer::service::run(config, shutdown)
    })
    .await
}
