//! The `router` binary: configuration from flags and environment, then
//! [`devfleet_router::run`].

use clap::Parser;
use devfleet_router::Config;
use devfleet_runtime::ConnectArgs;
use std::time::Duration;

/// devfleet router: QA dispatch, retries with backoff, dead letters,
/// escalations and circuit breakers.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The failure (counted across retries and fixes) that dead-letters a task.
    #[arg(long, env = "DEVFLEET_ROUTER_MAX_FAILURES", default_value_t = 3)]
    max_failures: u32,
    /// Delay before the first retry, in ms.
    #[arg(long, env = "DEVFLEET_RETRY_BASE_MS", default_value_t = 1_000)]
    retry_base_ms: u64,
    /// Growth of the delay per failure.
    #[arg(long, env = "DEVFLEET_RETRY_FACTOR", default_value_t = 2.0)]
    retry_factor: f64,
    /// Longest retry delay, in ms.
    #[arg(long, env = "DEVFLEET_RETRY_CAP_MS", default_value_t = 60_000)]
    retry_cap_ms: u64,
    /// Share of the delay that is random (0 = none, 0.5 = up to half shorter).
    #[arg(long, env = "DEVFLEET_RETRY_JITTER", default_value_t = 0.5)]
    retry_jitter: f64,
    /// How long past its retry delay the router holds a failed task.
    #[arg(long, env = "DEVFLEET_RETRY_LEASE_GRACE_MS", default_value_t = 30_000)]
    retry_lease_grace_ms: u64,
    /// Sliding window of the circuit breakers, in ms.
    #[arg(long, env = "DEVFLEET_BREAKER_WINDOW_MS", default_value_t = 60_000)]
    breaker_window_ms: u64,
    /// Granularity of the breaker window, in ms.
    #[arg(long, env = "DEVFLEET_BREAKER_BUCKET_MS", default_value_t = 5_000)]
    breaker_bucket_ms: u64,
    /// Outcomes the window must hold before its error rate can open a breaker.
    #[arg(long, env = "DEVFLEET_BREAKER_MIN_VOLUME", default_value_t = 10)]
    breaker_min_volume: u64,
    /// Error share above which a breaker opens.
    #[arg(long, env = "DEVFLEET_BREAKER_THRESHOLD", default_value_t = 0.5)]
    breaker_threshold: f64,
    /// Time a breaker stays open before probes are let through, in ms.
    #[arg(long, env = "DEVFLEET_BREAKER_COOLDOWN_MS", default_value_t = 30_000)]
    breaker_cooldown_ms: u64,
    /// Dispatches let through while half-open.
    #[arg(long, env = "DEVFLEET_BREAKER_PROBES", default_value_t = 2)]
    breaker_probes: u32,
    /// How often breaker timers and parked QA work are looked at, in ms.
    #[arg(long, env = "DEVFLEET_BREAKER_TICK_MS", default_value_t = 250)]
    breaker_tick_ms: u64,
    /// Handlers in flight per consumed queue.
    #[arg(long, env = "DEVFLEET_ROUTER_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// Index the bus dead-letter queue into the store (`devfleet dlq list`).
    #[arg(long, env = "DEVFLEET_INDEX_BUS_DLQ", default_value_t = true, action = clap::ArgAction::Set)]
    index_bus_dlq: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    devfleet_runtime::serve(
        "router",
        &args.connect,
        |connections, shutdown| async move {
            let mut config = Config::new(connections);
            config.max_failures = args.max_failures;
            config.backoff.base = Duration::from_millis(args.retry_base_ms);
            config.backoff.factor = args.retry_factor;
            config.backoff.cap = Duration::from_millis(args.retry_cap_ms);
            config.backoff.jitter = args.retry_jitter;
            config.retry_lease_grace = Duration::from_millis(args.retry_lease_grace_ms);
            config.breaker.window = Duration::from_millis(args.breaker_window_ms);
            config.breaker.bucket = Duration::from_millis(args.breaker_bucket_ms);
            config.breaker.min_volume = args.breaker_min_volume;
            config.breaker.threshold = args.breaker_threshold;
            config.breaker.cooldown = Duration::from_millis(args.breaker_cooldown_ms);
            config.breaker.probes = args.breaker_probes;
            config.breaker_tick = Duration::from_millis(args.breaker_tick_ms);
            config.handler_concurrency = args.concurrency;
            config.index_bus_dlq = args.index_bus_dlq;
            devfleet_router::run(config, shutdown).await
        },
    )
    .await
}
