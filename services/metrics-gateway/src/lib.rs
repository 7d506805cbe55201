//! The metrics-gateway service: what operators look at.
//!
//! It listens to every metric sample (`devfleet.metrics.>`) and pipeline
//! event (`devfleet.events.>`), keeps them in memory-bounded time windows,
//! polls the store and bus for the pipeline's state, and serves on one
//! address:
//!
//! * `ws://ADDR/ws`: the WebSocket stream (JSON frames; welcome,
//!   subscribe/unsubscribe, `metric` pushes for subscribed types only,
//!   windowed `stats`, ping every `ping_interval`, drop after
//!   `pong_timeout` without a pong) — see [`protocol`];
//! * `/metrics`: Prometheus text format (queue depths, tasks by state,
//!   latency histograms, workers, cache, breakers, canary weights);
//! * `/`: the live dashboard; `/api/overview`, `/api/plans`,
//!   `/api/plans/{id}`: its JSON;
//! * `/healthz`.
//!
//! # Guarantees
//!
//! * Publishing to clients never waits on a client: each has a bounded
//!   queue, and a client whose queue is full is disconnected (reason
//!   `slow_client`), so a slow client never slows the others.
//! * Memory is bounded whatever the sample rate or client count: windows
//!   by [`window::WindowConfig`], per-client queues by `client_queue`,
//!   connections by `max_connections`, frames by `max_frame_bytes`.
//! * A broadcast that does not decode is counted and skipped, never fatal.
//! * Delivery is best effort (broadcasts are); the store stays the truth,
//!   and the dashboard re-reads it.
//! * Once the gateway answers any request, its broadcast listeners are in
//!   place: a sample published after that reaches subscribed clients.

use anyhow::Context as _;
use devfleet_runtime::Connections;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod auth;
pub mod client;
mod connection;
mod exposition;
mod gateway;
mod http;
mod hub;
mod ingest;
mod prometheus;
pub mod protocol;
mod snapshot;
pub mod window;

pub use http::Refusal;
pub use window::WindowConfig;

/// The address used when `DEVFLEET_GATEWAY_ADDR` is not set.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7070";

/// Settings of the metrics-gateway service.
#[derive(Clone)]
pub struct Config {
    pub connections: Connections,
    /// Where to listen (`DEVFLEET_GATEWAY_ADDR`); ignored when `listener` is set.
    pub addr: SocketAddr,
    /// An already bound listener to serve on instead of binding `addr`
    /// (tests bind port 0 and read the port before starting the gateway).
    pub listener: Option<Arc<std::net::TcpListener>>,
    /// Token every client must present (`DEVFLEET_GATEWAY_TOKEN`); `None`
    /// serves everyone.
    pub token: Option<String>,
    /// Origins allowed to open the WebSocket (`DEVFLEET_GATEWAY_ORIGINS`);
    /// empty means same origin only, `*` any. Clients sending no Origin
    /// (non-browsers) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Time between pings to each client.
    pub ping_interval: Duration,
    /// A client that sent no pong for this long is dropped.
    pub pong_timeout: Duration,
    /// Frames queued per client before it is dropped as slow.
    pub client_queue: usize,
    /// Largest frame or message a client may send, in bytes.
    pub max_frame_bytes: usize,
    /// Most WebSocket connections at once; more are refused with 503.
    pub max_connections: usize,
    /// Aggregation windows for `stats`.
    pub window: WindowConfig,
    /// Time between reads of the store and bus.
    pub poll_interval: Duration,
    /// Unfinished plans whose tasks are read each poll (newest first).
    pub max_tracked_plans: usize,
    /// Name of this instance, for logs and `/api/overview`.
    pub instance: String,
}

impl Config {
    /// Defaults that work on loopback: `127.0.0.1:7070`, no token, pings
    /// every 30 s, drop after 60 s without a pong, a 1024-frame queue per
    /// client, 64 KiB frames, a 60 s window, a poll every 2 s.
    pub fn new(connections: Connections) -> Self {
        Self {
            connections,
            addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            listener: None,
            token: None,
            allowed_origins: Vec::new(),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(60),
            client_queue: 1024,
            max_frame_bytes: 64 * 1024,
            max_connections: 10_000,
            window: WindowConfig::default(),
            poll_interval: Duration::from_secs(2),
            max_tracked_plans: 20,
            instance: devfleet_runtime::instance_name("metrics-gateway"),
        }
    }

    /// [`Config::new`] with the `DEVFLEET_GATEWAY_*` environment applied
    /// (for `devfleet up`); errors name the variable.
    pub fn from_env(connections: Connections) -> anyhow::Result<Self> {
        #[derive(clap::Parser)]
        struct EnvOnly {
            #[command(flatten)]
            gateway: GatewayArgs,
        }
        let parsed = <EnvOnly as clap::Parser>::try_parse_from(["metrics-gateway"])
            .map_err(|e| anyhow::anyhow!("reading the DEVFLEET_GATEWAY_* variables: {e}"))?;
        parsed.gateway.apply(Self::new(connections))
    }

    /// Serve on an already bound listener instead of binding `addr`.
    pub fn with_listener(mut self, listener: std::net::TcpListener) -> Self {
        if let Ok(addr) = listener.local_addr() {
            self.addr = addr;
        }
        self.listener = Some(Arc::new(listener));
        self
    }

    /// Checks the settings; the error names the offending setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.ping_interval.is_zero(),
            "DEVFLEET_GATEWAY_PING_INTERVAL must be more than 0"
        );
        anyhow::ensure!(
            self.pong_timeout > self.ping_interval,
            "DEVFLEET_GATEWAY_PONG_TIMEOUT ({:?}) must be longer than DEVFLEET_GATEWAY_PING_INTERVAL ({:?}), \
             or every client is dropped between two pings",
            self.pong_timeout,
            self.ping_interval
        );
        anyhow::ensure!(
            self.client_queue >= 1,
            "DEVFLEET_GATEWAY_CLIENT_QUEUE must be at least 1"
        );
        anyhow::ensure!(
            self.max_frame_bytes >= 1024,
            "DEVFLEET_GATEWAY_MAX_FRAME_BYTES must be at least 1024"
        );
        anyhow::ensure!(
            self.max_connections >= 1,
            "DEVFLEET_GATEWAY_MAX_CONNECTIONS must be at least 1"
        );
        anyhow::ensure!(
            !self.window.window.is_zero() && self.window.buckets >= 1,
            "DEVFLEET_GATEWAY_WINDOW must be more than 0 and DEVFLEET_GATEWAY_WINDOW_BUCKETS at least 1"
        );
        anyhow::ensure!(
            self.window.reservoir >= 1,
            "DEVFLEET_GATEWAY_RESERVOIR must be at least 1"
        );
        anyhow::ensure!(
            !self.poll_interval.is_zero(),
            "DEVFLEET_GATEWAY_POLL_INTERVAL must be more than 0"
        );
        if let Some(token) = &self.token {
            anyhow::ensure!(
                !token.trim().is_empty()
                    && token.is_ascii()
                    && !token.contains(char::is_whitespace),
                "DEVFLEET_GATEWAY_TOKEN must be non-empty printable ASCII without spaces"
            );
        }
        Ok(())
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !v.is_finite() || v <= 0.0 || v > 1e9 {
        return Err(format!("'{s}' must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// The gateway's flags and environment variables, for `main` and for
/// [`Config::from_env`].
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Address to serve HTTP and WebSocket on.
    #[arg(long = "addr", env = "DEVFLEET_GATEWAY_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,
    /// Token clients must present (Authorization: Bearer, or ?token=).
    #[arg(long = "token", env = "DEVFLEET_GATEWAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Comma-separated origins allowed to open the WebSocket ("*" for any;
    /// unset: same origin only).
    #[arg(
        long = "origins",
        env = "DEVFLEET_GATEWAY_ORIGINS",
        value_delimiter = ','
    )]
    pub origins: Vec<String>,
    /// Seconds between pings to each client.
    #[arg(long, env = "DEVFLEET_GATEWAY_PING_INTERVAL", default_value = "30", value_parser = parse_seconds)]
    pub ping_interval: Duration,
    /// Seconds without a pong after which a client is dropped.
    #[arg(long, env = "DEVFLEET_GATEWAY_PONG_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    pub pong_timeout: Duration,
    /// Frames queued per client before it is dropped as slow.
    #[arg(long, env = "DEVFLEET_GATEWAY_CLIENT_QUEUE", default_value_t = 1024)]
    pub client_queue: usize,
    /// Largest frame a client may send, in bytes.
    #[arg(
        long,
        env = "DEVFLEET_GATEWAY_MAX_FRAME_BYTES",
        default_value_t = 65536
    )]
    pub max_frame_bytes: usize,
    /// Most WebSocket connections at once.
    #[arg(
        long,
        env = "DEVFLEET_GATEWAY_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub max_connections: usize,
    /// Seconds of the aggregation window for stats.
    #[arg(long, env = "DEVFLEET_GATEWAY_WINDOW", default_value = "60", value_parser = parse_seconds)]
    pub window: Duration,
    /// Slices of the window (it slides by one slice).
    #[arg(long, env = "DEVFLEET_GATEWAY_WINDOW_BUCKETS", default_value_t = 12)]
    pub window_buckets: usize,
    /// Sample values kept per slice and field for percentiles.
    #[arg(long, env = "DEVFLEET_GATEWAY_RESERVOIR", default_value_t = 128)]
    pub reservoir: usize,
    /// Most (metric type, field) series aggregated at once.
    #[arg(long, env = "DEVFLEET_GATEWAY_MAX_SERIES", default_value_t = 512)]
    pub max_series: usize,
    /// Seconds between reads of the store and bus.
    #[arg(long, env = "DEVFLEET_GATEWAY_POLL_INTERVAL", default_value = "2", value_parser = parse_seconds)]
    pub poll_interval: Duration,
    /// Unfinished plans whose tasks are read each poll.
    #[arg(long, env = "DEVFLEET_GATEWAY_TRACKED_PLANS", default_value_t = 20)]
    pub tracked_plans: usize,
}

impl GatewayArgs {
    /// Applies these settings to `config` and validates the result.
    pub fn apply(&self, mut config: Config) -> anyhow::Result<Config> {
        config.addr = self.addr;
        config.token = self.token.clone().filter(|t| !t.is_empty());
        config.allowed_origins = self
            .origins
            .iter()
            .map(|o| o.trim().to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        config.ping_interval = self.ping_interval;
        config.pong_timeout = self.pong_timeout;
        config.client_queue = self.client_queue;
        config.max_frame_bytes = self.max_frame_bytes;
        config.max_connections = self.max_connections;
        config.window = WindowConfig {
            window: self.window,
            buckets: self.window_buckets,
            reservoir: self.reservoir,
            max_series: self.max_series,
        };
        config.poll_interval = self.poll_interval;
        config.max_tracked_plans = self.tracked_plans;
        config.validate()?;
        Ok(config)
    }
}

async fn bind(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    match &config.listener {
        Some(listener) => {
            let std = listener
                .try_clone()
                .context("duplicating the gateway's pre-bound listener")?;
            std.set_nonblocking(true)
                .context("making the gateway listener non-blocking")?;
            tokio::net::TcpListener::from_std(std).context("adopting the gateway listener")
        }
        None => tokio::net::TcpListener::bind(config.addr)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (DEVFLEET_GATEWAY_ADDR): is another gateway running?",
                    config.addr
                )
            }),
    }
}

/// Runs the gateway until `shutdown` is cancelled; then closes every
/// WebSocket connection (close code 1001) and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let listener = bind(&config).await?;
    let local = listener
        .local_addr()
        .context("reading the gateway's address")?;
    let stop = shutdown.child_token();
    let connections = config.connections.clone();

    // Listen before serving: once a client is answered, no sample is missed.
    let metrics_pattern = format!("{}.>", devfleet_protocol::queues::METRICS_PREFIX);
    let events_pattern = format!("{}.>", devfleet_protocol::queues::EVENTS_PREFIX);
    let metrics_listener = connections
        .broadcast
        .listen(&metrics_pattern)
        .await
        .with_context(|| format!("listening on {metrics_pattern}"))?;
    let events_listener = connections
        .broadcast
        .listen(&events_pattern)
        .await
        .with_context(|| format!("listening on {events_pattern}"))?;

    let gateway = gateway::Gateway::new(config, stop.clone());
    let background = TaskTracker::new();
    background.spawn(ingest::run(
        gateway.clone(),
        metrics_listener,
        metrics_pattern,
        stop.clone(),
    ));
    background.spawn(ingest::run(
        gateway.clone(),
        events_listener,
        events_pattern,
        stop.clone(),
    ));
    background.spawn(snapshot::run(gateway.clone(), stop.clone()));

    let websockets = TaskTracker::new();
    let app = http::router(gateway.clone(), websockets.clone());
    tracing::info!(
        addr = %local,
        auth = gateway.config.token.is_some(),
        "metrics gateway: dashboard http://{local}/ , stream ws://{local}/ws , metrics http://{local}/metrics"
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await;
    stop.cancel();
    background.close();
    websockets.close();
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        background.wait().await;
        websockets.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some gateway tasks did not stop within 5 s");
    }
    served.context("serving HTTP")
}
