//! What every devfleet service binary shares: connection settings read
//! from the environment, the shutdown signal, publishing envelopes with
//! trace context, and best-effort metric emission.
//!
//! Services take a [`Connections`] in their config, so the embedded mode can
//! hand every service the same in-memory bus and store.

use anyhow::Context as _;
use devfleet_bus::{Bus, SharedBus};
use devfleet_protocol::{queues, Envelope, Message, Metric, MetricBody, MetricType};
use devfleet_store::SharedStore;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub mod backoff;
pub mod capabilities;
pub mod consume;
pub mod settings;

/// Which transport carries work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    Amqp,
    Nats,
    Memory,
}

/// Connection settings every binary accepts, as flags or environment
/// variables (the names in DESIGN.md).
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Which broker carries work: amqp, nats or memory.
    #[arg(long, env = "DEVFLEET_BUS", value_enum, default_value = "amqp")]
    pub bus: BusKind,
    /// RabbitMQ URL, used when DEVFLEET_BUS=amqp.
    #[arg(
        long,
        env = "DEVFLEET_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// NATS URL: carries work when DEVFLEET_BUS=nats, and metrics whenever set.
    #[arg(long, env = "DEVFLEET_NATS_URL")]
    pub nats_url: Option<String>,
    /// Redis URL of the task store (`memory://` for an in-process store).
    #[arg(
        long,
        env = "DEVFLEET_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,
    /// Prefix for every queue name and store key, so several pipelines (or
    /// test runs) can share one broker and Redis without seeing each other.
    #[arg(long, env = "DEVFLEET_NAMESPACE", default_value = "")]
    pub namespace: String,
}

/// The bus for work, the bus for metrics and events, and the store.
#[derive(Clone)]
pub struct Connections {
    /// Durable work queues.
    pub bus: SharedBus,
    /// Broadcast subjects (metrics, events): NATS core when configured, else `bus`.
    pub broadcast: SharedBus,
    pub store: SharedStore,
    /// Prefix applied to every queue name (empty by default).
    pub namespace: String,
}

impl Connections {
    /// The broker queue name for a logical queue (see [`devfleet_protocol::queues`]).
    pub fn queue(&self, name: &str) -> String {
        if self.namespace.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.namespace)
        }
    }

    /// Returns a copy whose queues are prefixed with `namespace`.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Starts a consumer on a logical queue (namespace applied).
    pub async fn consume(
        &self,
        queue: &str,
        options: devfleet_bus::ConsumeOptions,
    ) -> anyhow::Result<devfleet_bus::Consumer> {
        let name = self.queue(queue);
        self.bus
            .consume(&name, options)
            .await
            .with_context(|| format!("consuming from {name}"))
    }

    /// Waiting messages in a logical queue (namespace applied).
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<u64> {
        let name = self.queue(queue);
        self.bus
            .queue_depth(&name)
            .await
            .with_context(|| format!("reading the depth of {name}"))
    }

    /// One in-memory bus and store, shared: the embedded mode.
    pub fn in_memory() -> Self {
        let bus: SharedBus = Arc::new(devfleet_bus::memory::MemoryBus::new());
        Self {
            broadcast: bus.clone(),
            bus,
            store: Arc::new(devfleet_store::memory::MemoryStore::new()),
            namespace: String::new(),
        }
    }

    /// Publishes a message to a logical work queue (namespace applied) in
    /// an envelope carrying the current trace context; returns once the
    /// broker confirmed it.
    pub async fn publish(&self, queue: &str, message: impl Into<Message>) -> anyhow::Result<()> {
        let envelope =
            Envelope::new(message).with_traceparent(devfleet_telemetry::current_traceparent());
        let name = self.queue(queue);
        devfleet_bus::publish_envelope(self.bus.as_ref(), &name, &envelope)
            .await
            .with_context(|| format!("publishing {} to {name}", envelope.kind()))
    }

    /// Broadcasts an event (best effort; failures are logged, not returned).
    pub async fn event(&self, message: impl Into<Message>) {
        let envelope =
            Envelope::new(message).with_traceparent(devfleet_telemetry::current_traceparent());
        let subject = queues::event_subject(envelope.kind());
        broadcast_envelope(self.broadcast.as_ref(), &subject, &envelope).await;
    }

    /// A metric emitter tagged with `source`.
    pub fn metrics(&self, source: impl Into<String>) -> Metrics {
        Metrics {
            bus: self.broadcast.clone(),
            source: source.into(),
        }
    }
}

async fn broadcast_envelope(bus: &dyn Bus, subject: &str, envelope: &Envelope) {
    match envelope.encode() {
        Ok(bytes) => {
            if let Err(e) = bus.broadcast(subject, &bytes).await {
                tracing::debug!(%subject, error = %e, "broadcast failed");
            }
        }
        Err(e) => tracing::warn!(%subject, error = %e, "cannot encode broadcast"),
    }
}

impl ConnectArgs {
    /// Connects to the configured bus, metrics transport and store. Errors
    /// name the variable whose server could not be reached.
    pub async fn connect(&self) -> anyhow::Result<Connections> {
        let bus = match self.bus {
            BusKind::Amqp => devfleet_bus::connect(&self.amqp_url)
                .await
                .context("connecting to RabbitMQ (DEVFLEET_AMQP_URL)")?,
            BusKind::Nats => {
                let url = self.nats_url.as_deref().context(
                    "DEVFLEET_BUS=nats needs DEVFLEET_NATS_URL (e.g. nats://127.0.0.1:4222)",
                )?;
                devfleet_bus::connect(url)
                    .await
                    .context("connecting to NATS (DEVFLEET_NATS_URL)")?
            }
            BusKind::Memory => Arc::new(devfleet_bus::memory::MemoryBus::new()),
        };
        let broadcast = match (&self.nats_url, self.bus) {
            (Some(_), BusKind::Nats) => bus.clone(),
            (Some(url), _) => devfleet_bus::connect(url)
                .await
                .context("connecting to NATS for metrics (DEVFLEET_NATS_URL)")?,
            (None, _) => bus.clone(),
        };
        let store = self.connect_store().await?;
        Ok(Connections {
            bus,
            broadcast,
            store,
            namespace: self.namespace.clone(),
        })
    }
}

impl ConnectArgs {
    /// Connects to the store alone (for commands that need no broker),
    /// under the namespace's key prefix.
    pub async fn connect_store(&self) -> anyhow::Result<SharedStore> {
        let prefix = if self.namespace.is_empty() {
            "devfleet".to_owned()
        } else {
            format!("devfleet:{}", self.namespace)
        };
        devfleet_store::connect_with_prefix(&self.redis_url, &prefix)
            .await
            .context("connecting to Redis (DEVFLEET_REDIS_URL)")
    }
}

/// Emits metrics of one source on `devfleet.metrics.<type>`. Best effort:
/// a metric that cannot be sent is dropped with a debug log.
#[derive(Clone)]
pub struct Metrics {
    bus: SharedBus,
    source: String,
}

impl Metrics {
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Sends one sample; its type follows from the body.
    pub async fn emit<B: MetricBody>(&self, body: B) {
        match Metric::from_body(self.source.clone(), &body) {
            Ok(metric) => self.send(metric).await,
            Err(e) => {
                tracing::warn!(metric_type = B::METRIC_TYPE.as_str(), error = %e, "cannot encode metric")
            }
        }
    }

    /// Sends a body this build has no struct for, as it is: for tests of
    /// readers (unknown and older bodies) and for forwarding. Services emit
    /// typed bodies with [`Metrics::emit`].
    pub async fn emit_value(&self, metric_type: MetricType, data: serde_json::Value) {
        self.send(Metric {
            metric_type,
            source: self.source.clone(),
            data,
        })
        .await;
    }

    async fn send(&self, metric: Metric) {
        let subject = queues::metric_subject(metric.metric_type);
        let envelope = Envelope::new(metric);
        broadcast_envelope(self.bus.as_ref(), &subject, &envelope).await;
    }
}

/// A token cancelled on the first SIGINT (Ctrl-C) or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing in-flight work");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A name for this process instance: `service@host-pid`.
pub fn instance_name(service: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into());
    format!("{service}@{host}-{}", std::process::id())
}

/// The body of every service's `main`, after [`settings::parse`]: starts
/// the async runtime, telemetry (then logs any deprecated variable in
/// use), connections from the settings, shutdown on SIGINT/SIGTERM, then
/// the service's `run`. Call it from a plain `fn main`, not from inside a
/// runtime.
pub fn serve<F, Fut>(service: &str, connect: &ConnectArgs, run: F) -> anyhow::Result<()>
where
    F: FnOnce(Connections, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let _telemetry = devfleet_telemetry::init(service)?;
        for warning in settings::take_warnings() {
            tracing::warn!("{warning}");
        }
        let shutdown = shutdown_on_signals();
        let connections = connect.connect().await?;
        let result = run(connections.clone(), shutdown).await;
        connections.bus.close().await;
        connections.broadcast.close().await;
        result
    })
}
