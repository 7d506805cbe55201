//! The `scheduler` binary: configuration from flags and environment, then
//! [`devfleet_scheduler::run`].

use clap::Parser;
use devfleet_runtime::ConnectArgs;
use devfleet_scheduler::Config;
use std::time::Duration;

/// devfleet scheduler: keeps tasks in the priority store and dispatches each
/// the moment its dependencies are done.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Complete task.built and fail task.failed here, without QA or retries.
    /// Only for setups that run no router; never together with one.
    #[arg(long, env = "DEVFLEET_DIRECT_ROUTING", default_value_t = false, action = clap::ArgAction::Set)]
    direct_routing: bool,
    /// How long a dispatched task may wait for a worker before it is Ready again.
    #[arg(long, env = "DEVFLEET_DISPATCH_LEASE_MS", default_value_t = 30_000)]
    dispatch_lease_ms: u64,
    /// How often worker capacity is re-read while work waits for slots.
    #[arg(long, env = "DEVFLEET_DISPATCH_TICK_MS", default_value_t = 20)]
    dispatch_tick_ms: u64,
    /// How often expired leases are returned to Ready.
    #[arg(long, env = "DEVFLEET_REAP_INTERVAL_MS", default_value_t = 1_000)]
    reap_interval_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    devfleet_runtime::serve(
        "scheduler",
        &args.connect,
        |connections, shutdown| async move {
            let mut config = Config::new(connections);
            config.direct_routing = args.direct_routing;
            config.dispatch_lease = Duration::from_millis(args.dispatch_lease_ms);
            config.dispatch_tick = Duration::from_millis(args.dispatch_tick_ms);
            config.reap_interval = Duration::from_millis(args.reap_interval_ms);
            devfleet_scheduler::run(config, shutdown).await
        },
    )
    .await
}
