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
pub mod settings;
mod snapshot;
pub mod window;

pub use auth::{token_from_env, TOKEN_ENV, TOKEN_FILE_ENV};
pub use http::Refusal;
pub use settings::Settings;
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
    /// Token every client must present (`DEVFLEET_GATEWAY_TOKEN` or the
    /// file `DEVFLEET_GATEWAY_TOKEN_FILE` names, see
    /// [`Config::with_token_from_env`]); `None` serves everyone.
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
    /// Defaults that work on loopback (those of [`Settings`], no
    /// environment): `127.0.0.1:7070`, no token, pings every 30 s, drop
    /// after 60 s without a pong, a 1024-frame queue per client, 64 KiB
    /// frames, a 60 s window, a poll every 2 s.
    pub fn new(connections: Connections) -> Self {
        Settings::default().into_config(connections)
    }

    /// The same configuration with the token of the environment
    /// ([`token_from_env`]); how the binary and `devfleet up` get it.
    pub fn with_token_from_env(mut self) -> anyhow::Result<Self> {
        self.token = token_from_env()?;
        Ok(self)
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
            "DEVFLEET_GATEWAY_PING_INTERVAL_SECONDS must be more than 0"
        );
        anyhow::ensure!(
            self.pong_timeout > self.ping_interval,
            "DEVFLEET_GATEWAY_PONG_TIMEOUT_SECONDS ({:?}) must be longer than DEVFLEET_GATEWAY_PING_INTERVAL_SECONDS ({:?}), \
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
            "DEVFLEET_GATEWAY_WINDOW_SECONDS must be more than 0 and DEVFLEET_GATEWAY_WINDOW_BUCKETS at least 1"
        );
        anyhow::ensure!(
            self.window.reservoir >= 1,
            "DEVFLEET_GATEWAY_RESERVOIR must be at least 1"
        );
        anyhow::ensure!(
            !self.poll_interval.is_zero(),
            "DEVFLEET_GATEWAY_POLL_INTERVAL_SECONDS must be more than 0"
        );
        if let Some(token) = &self.token {
            anyhow::ensure!(
                !token.trim().is_empty()
                    && token.is_ascii()
                    && !token.contains(char::is_whitespace),
                "DEVFLEET_GATEWAY_TOKEN must be non-empty printable ASCII without spaces"
            );
        }
        // Without a token, the Origin check is all that stands between a
        // browser on another site and the stream; the same-origin default
        // trusts the Host header, which DNS rebinding controls. So off
        // loopback an explicit allow-list is required.
        anyhow::ensure!(
            self.token.is_some()
                || !self.allowed_origins.is_empty()
                || self.addr.ip().is_loopback(),
            "DEVFLEET_GATEWAY_ORIGINS must list the origins allowed to open the WebSocket \
             (e.g. https://ops.example.com, or * for any) when DEVFLEET_GATEWAY_ADDR ({}) is \
             not a loopback address and no DEVFLEET_GATEWAY_TOKEN is set",
            self.addr
        );
        Ok(())
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
