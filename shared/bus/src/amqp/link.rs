//! A reconnecting connection to RabbitMQ.
//!
//! A [`Link`] hands out channels on its current connection and opens a new
//! connection when that one is gone (broker restart, network error). It
//! does not replay anything itself: each user re-does its own setup on the
//! fresh channel (consumers re-declare and re-consume, publishers
//! re-declare before publishing), guided by [`Link::retry`] and [`Fault`].

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::ShortString;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest wait for one broker round trip (declare, qos, consume, purge,
/// opening a channel) before the connection is presumed dead.
pub(super) const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest wait for the TCP connect and AMQP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why one attempt at a broker operation failed, and whether to try again.
#[derive(Debug, Clone)]
pub(super) enum Fault {
    /// Broker down, connection lost, channel closed: worth retrying.
    Transient(String),
    /// Like `Transient`, but the broker did not answer in time.
    Timeout(String),
    /// Retrying cannot help (refused credentials, mismatched queue
    /// arguments, an over-long name).
    Permanent(String),
    /// The bus was closed.
    Closed,
}

impl Fault {
    pub(super) fn reason(&self) -> String {
        match self {
            Fault::Transient(r) | Fault::Timeout(r) | Fault::Permanent(r) => r.clone(),
            Fault::Closed => "bus is closed".to_owned(),
        }
    }
}

impl From<lapin::Error> for Fault {
    fn from(err: lapin::Error) -> Self {
        let permanent = match err.kind() {
            ErrorKind::ProtocolError(e) => matches!(
                e.kind(),
                AMQPErrorKind::Soft(
                    AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED
                ) | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
            ),
            ErrorKind::AuthProviderError(_)
            | ErrorKind::InvalidProtocolVersion(_)
            | ErrorKind::NoDefaultRuntime => true,
            _ => false,
        };
        if permanent {
            Fault::Permanent(err.to_string())
        } else {
            Fault::Transient(err.to_string())
        }
    }
}

/// True when the broker said the queue or exchange does not exist.
pub(super) fn is_not_found(err: &lapin::Error) -> bool {
    matches!(err.kind(), ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Runs one broker round trip with [`OP_TIMEOUT`].
pub(super) async fn op<T>(
    what: &str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T, Fault> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Fault::from(e)),
        Err(_) => Err(Fault::Timeout(format!(
            "{what}: no answer from the broker within {OP_TIMEOUT:?}"
        ))),
    }
}

/// A name as AMQP wants it, or a permanent fault when it is too long.
pub(super) fn short(name: &str) -> Result<ShortString, Fault> {
    ShortString::try_new(name).map_err(|e| Fault::Permanent(format!("'{name}': {e}")))
}

/// Exponential backoff between reconnect attempts: 100 ms doubling to a
/// cap of 2 s, so a consumer is back within about 2 s of the broker.
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(2);

    pub(super) fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        delay
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// When a consumer or listener may try to subscribe again. It keeps the
/// time rather than sleeping a fresh delay, so a caller that cancels
/// `next()` (a `select!` with a timeout) neither restarts nor stretches
/// the wait.
#[derive(Debug)]
pub(super) struct Pacer {
    backoff: Backoff,
    not_before: Option<Instant>,
}

impl Pacer {
    pub(super) fn new() -> Self {
        Pacer {
            backoff: Backoff::new(),
            not_before: None,
        }
    }

    /// The subscription failed or broke: back off before the next try.
    pub(super) fn failed(&mut self) {
        self.not_before = Some(Instant::now() + self.backoff.next_delay());
    }

    pub(super) fn succeeded(&mut self) {
        self.backoff.reset();
        self.not_before = None;
    }

    /// Waits until the next try is due; false when `closed` fires first.
    pub(super) async fn wait(&self, closed: &CancellationToken) -> bool {
        let Some(at) = self.not_before else {
            return !closed.is_cancelled();
        };
        tokio::select! {
            _ = tokio::time::sleep_until(at) => true,
            _ = closed.cancelled() => false,
        }
    }
}

/// Closes a channel in the background; its unacked messages go back to
/// their queues.
pub(super) fn close_in_background(channel: Channel, why: &'static str) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if channel.status().connected() {
                let _ = tokio::time::timeout(
                    OP_TIMEOUT,
                    channel.close(lapin::protocol::constants::REPLY_SUCCESS, why.into()),
                )
                .await;
            }
        });
    }
}

/// A channel and the connection generation it belongs to.
pub(super) struct Session {
    pub(super) channel: Channel,
    pub(super) generation: u64,
}

/// One reconnecting connection. See the module docs.
pub(super) struct Link {
    url: String,
    name: &'static str,
    closed: CancellationToken,
    state: tokio::sync::Mutex<State>,
    declared: Mutex<Declared>,
}

#[derive(Default)]
struct State {
    connection: Option<Arc<Connection>>,
    generation: u64,
    /// The confirm-mode channel shared by publishers.
    publisher: Option<Channel>,
}

/// Queues and exchanges declared on the current connection generation.
#[derive(Default)]
struct Declared {
    generation: u64,
    names: HashSet<String>,
}

impl Link {
    /// A link that connects on first use. `name` shows in the broker's
    /// connection list.
    pub(super) fn new(url: &str, name: &'static str, closed: CancellationToken) -> Self {
        Link {
            url: url.to_owned(),
            name,
            closed,
            state: tokio::sync::Mutex::new(State::default()),
            declared: Mutex::new(Declared::default()),
        }
    }

    pub(super) fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// The current connection, opening one if there is none or it died.
    async fn connection(&self, state: &mut State) -> Result<Arc<Connection>, Fault> {
        if self.closed.is_cancelled() {
            return Err(Fault::Closed);
        }
        if let Some(conn) = &state.connection {
            if conn.status().connected() {
                return Ok(conn.clone());
            }
        }
        state.connection = None;
        state.publisher = None;
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("devfleet-{}", self.name).into());
        let connect =
            tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.url, properties));
        let conn = tokio::select! {
            r = connect => match r {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(Fault::from(e)),
                Err(_) => return Err(Fault::Timeout(format!("connect: no answer within {CONNECT_TIMEOUT:?}"))),
            },
            _ = self.closed.cancelled() => return Err(Fault::Closed),
        };
        state.generation += 1;
        tracing::info!(
            link = self.name,
            generation = state.generation,
            "connected to RabbitMQ"
        );
        let conn = Arc::new(conn);
        state.connection = Some(conn.clone());
        Ok(conn)
    }

    /// A new channel of its own, e.g. for one consumer.
    pub(super) async fn open_channel(&self) -> Result<Session, Fault> {
        let mut state = self.state.lock().await;
        let conn = self.connection(&mut state).await?;
        let channel = op("opening a channel", conn.create_channel()).await?;
        Ok(Session {
            channel,
            generation: state.generation,
        })
    }

    /// The shared confirm-mode channel for publishing.
    pub(super) async fn publisher(&self) -> Result<Session, Fault> {
        let mut state = self.state.lock().await;
        let conn = self.connection(&mut state).await?;
        if let Some(channel) = &state.publisher {
            if channel.status().connected() {
                return Ok(Session {
                    channel: channel.clone(),
                    generation: state.generation,
                });
            }
        }
        let channel = op("opening a channel", conn.create_channel()).await?;
        op(
            "confirm.select",
            channel.confirm_select(lapin::options::ConfirmSelectOptions::default()),
        )
        .await?;
        state.publisher = Some(channel.clone());
        Ok(Session {
            channel,
            generation: state.generation,
        })
    }

    /// Forgets connection `generation` after it stopped answering, so the
    /// next user opens a fresh one.
    pub(super) async fn reset(&self, generation: u64) {
        let mut state = self.state.lock().await;
        if state.generation == generation {
            tracing::warn!(
                link = self.name,
                generation,
                "broker stopped answering; reconnecting"
            );
            state.connection = None;
            state.publisher = None;
        }
    }

    /// Resets after a timeout; other faults leave the connection alone
    /// (a dead one is noticed by its status).
    pub(super) async fn note(&self, generation: u64, fault: &Fault) {
        if matches!(fault, Fault::Timeout(_)) {
            self.reset(generation).await;
        }
    }

    pub(super) fn is_declared(&self, generation: u64, name: &str) -> bool {
        let declared = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        declared.generation == generation && declared.names.contains(name)
    }

    pub(super) fn mark_declared(&self, generation: u64, name: &str) {
        let mut declared = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        if declared.generation != generation {
            declared.generation = generation;
            declared.names.clear();
        }
        declared.names.insert(name.to_owned());
    }

    /// Forgets a declaration, e.g. after the broker said the queue is gone.
    pub(super) fn forget_declared(&self, name: &str) {
        let mut declared = self.declared.lock().unwrap_or_else(|e| e.into_inner());
        declared.names.remove(name);
    }

    /// Runs `attempt` until it succeeds, fails permanently, the bus closes,
    /// or `deadline` passes (never, when `None`), sleeping with [`Backoff`]
    /// between tries. Returns the last fault.
    pub(super) async fn retry<T, F, Fut>(
        &self,
        what: &str,
        deadline: Option<Instant>,
        mut attempt: F,
    ) -> Result<T, Fault>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Fault>>,
    {
        let mut backoff = Backoff::new();
        loop {
            if self.closed.is_cancelled() {
                return Err(Fault::Closed);
            }
            let fault = match attempt().await {
                Ok(v) => return Ok(v),
                Err(f @ (Fault::Permanent(_) | Fault::Closed)) => return Err(f),
                Err(f) => f,
            };
            let mut delay = backoff.next_delay();
            if let Some(deadline) = deadline {
                let now = Instant::now();
                if now >= deadline {
                    return Err(fault);
                }
                delay = delay.min(deadline - now);
            }
            tracing::debug!(link = self.name, what, reason = %fault.reason(), ?delay, "retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.closed.cancelled() => return Err(Fault::Closed),
            }
        }
    }

    /// Closes the connection; every later use fails with [`Fault::Closed`].
    pub(super) async fn close(&self) {
        self.closed.cancel();
        let connection = {
            let mut state = self.state.lock().await;
            state.publisher = None;
            state.connection.take()
        };
        if let Some(conn) = connection {
            if conn.status().connected() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    conn.close(lapin::protocol::constants::REPLY_SUCCESS, "closed".into()),
                )
                .await;
            }
        }
    }
}
