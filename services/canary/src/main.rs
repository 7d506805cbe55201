//! The `canary` binary: configuration from flags and environment, then
//! [`devfleet_canary::run`].

use clap::Parser;
use devfleet_runtime::ConnectArgs;
use std::time::Duration;

/// devfleet canary: progressive rollout with health checks and automatic rollback.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Lease owner name; unique among live replicas [default: canary@HOST-PID].
    #[arg(long, env = "DEVFLEET_CANARY_INSTANCE")]
    instance: Option<String>,
    /// Seconds between scans for deployments nobody drives.
    #[arg(long, env = "DEVFLEET_CANARY_SCAN_SECONDS", default_value_t = 2.0)]
    scan_seconds: f64,
    /// Seconds a deployment lease lasts; renewed every third of it.
    #[arg(long, env = "DEVFLEET_CANARY_LEASE_SECONDS", default_value_t = 15.0)]
    lease_seconds: f64,
    /// Failed health reads in a row before an automatic rollback.
    #[arg(long, env = "DEVFLEET_CANARY_FAILURE_LIMIT", default_value_t = 3)]
    failure_limit: u32,
    /// Checks in a row a stage may hold (degraded or no traffic) before an
    /// automatic rollback; 0 holds for ever.
    #[arg(long, env = "DEVFLEET_CANARY_HOLD_LIMIT", default_value_t = 0)]
    hold_limit: u32,
    /// Seconds a shift or rollback handler may run.
    #[arg(
        long,
        env = "DEVFLEET_CANARY_HANDLER_TIMEOUT_SECONDS",
        default_value_t = 60.0
    )]
    handler_timeout_seconds: f64,
    /// Tries of the shift handler before rolling back.
    #[arg(long, env = "DEVFLEET_CANARY_HANDLER_ATTEMPTS", default_value_t = 3)]
    handler_attempts: u32,
    /// Seconds one health read may take (capped at the check interval).
    #[arg(
        long,
        env = "DEVFLEET_CANARY_HEALTH_TIMEOUT_SECONDS",
        default_value_t = 10.0
    )]
    health_timeout_seconds: f64,
    /// Health checks kept per deployment.
    #[arg(long, env = "DEVFLEET_CANARY_HISTORY", default_value_t = 200)]
    history: usize,
    /// Seconds a finished deployment's record is kept.
    #[arg(
        long,
        env = "DEVFLEET_CANARY_RETAIN_SECONDS",
        default_value_t = 604_800.0
    )]
    retain_seconds: f64,
    /// Seconds between looks for an operator's rollback request.
    #[arg(
        long,
        env = "DEVFLEET_CANARY_CONTROL_POLL_SECONDS",
        default_value_t = 1.0
    )]
    control_poll_seconds: f64,
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        anyhow::anyhow!("{name} must be a non-negative number of seconds, got {value}")
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let durations = (
        seconds("DEVFLEET_CANARY_SCAN_SECONDS", args.scan_seconds)?,
        seconds("DEVFLEET_CANARY_LEASE_SECONDS", args.lease_seconds)?,
        seconds(
            "DEVFLEET_CANARY_HANDLER_TIMEOUT_SECONDS",
            args.handler_timeout_seconds,
        )?,
        seconds(
            "DEVFLEET_CANARY_HEALTH_TIMEOUT_SECONDS",
            args.health_timeout_seconds,
        )?,
        seconds("DEVFLEET_CANARY_RETAIN_SECONDS", args.retain_seconds)?,
        seconds(
            "DEVFLEET_CANARY_CONTROL_POLL_SECONDS",
            args.control_poll_seconds,
        )?,
    );
    devfleet_runtime::serve("canary", &args.connect, |connections, shutdown| {
        let mut config = devfleet_canary::Config::new(connections);
        if let Some(instance) = args.instance {
            config.instance = instance;
        }
        (
            config.scan_interval,
            config.lease_ttl,
            config.handler_timeout,
            config.health_timeout,
            config.retain,
            config.control_poll,
        ) = durations;
        config.failure_limit = args.failure_limit;
        config.hold_limit = args.hold_limit;
        config.handler_attempts = args.handler_attempts;
        config.history_limit = args.history;
        devfleet_canary::run(config, shutdown)
    })
    .await
}
