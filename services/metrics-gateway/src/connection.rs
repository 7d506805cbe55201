//! One WebSocket connection.
//!
//! Two halves run side by side. The writer drains the client's bounded
//! queue into the socket and sends a ping every `ping_interval`. The
//! reader handles requests (subscribe, unsubscribe, stats), notes pongs,
//! and ends the connection when no pong arrived within `pong_timeout`.
//! Replies go through the same bounded queue as metric frames, so frame
//! order is preserved and a client that floods requests without reading
//! replies is dropped as slow like any other. Whatever ends the connection
//! (client close, slow client, pong timeout, oversize frame, shutdown)
//! cancels the client's token, which stops both halves; then a bounded
//! closing handshake sends a close frame naming the reason.

use crate::gateway::Gateway;
use crate::hub::{Client, DisconnectReason};
use crate::protocol::{self, ClientRequest, RequestError, Welcome};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument as _;

/// Frames written before one flush, so a burst costs one syscall.
const MAX_BATCH: usize = 64;
/// How long the closing handshake may take; a slow client gets no more.
const CLOSE_GRACE: Duration = Duration::from_millis(250);

/// Serves one upgraded connection until it ends.
pub(crate) async fn serve(socket: WebSocket, gateway: Arc<Gateway>) {
    let config = &gateway.config;
    let (client, rx) = gateway.hub.register(|connection_id| {
        protocol::to_text(&Welcome {
            kind: "welcome".into(),
            connection_id: connection_id.to_owned(),
            server: "devfleet-metrics-gateway".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            metric_types: devfleet_protocol::MetricType::ALL
                .iter()
                .map(|m| m.as_str().to_owned())
                .collect(),
            ping_interval_seconds: config.ping_interval.as_secs_f64(),
            pong_timeout_seconds: config.pong_timeout.as_secs_f64(),
            max_queued_frames: config.client_queue,
            max_frame_bytes: config.max_frame_bytes,
        })
    });
    let span = tracing::debug_span!("ws.connection", connection_id = %client.connection_id);
    async {
        tracing::debug!("connected");
        let (sink, stream) = socket.split();
        let (sink, stream) = tokio::join!(
            write(&gateway, &client, sink, rx),
            read(&gateway, &client, stream)
        );
        let reason = client.reason().unwrap_or(DisconnectReason::Shutdown);
        if let Ok(socket) = sink.reunite(stream) {
            goodbye(socket, reason).await;
        }
        match reason {
            DisconnectReason::ClientClosed | DisconnectReason::Shutdown => {
                tracing::debug!(reason = reason.as_str(), "disconnected")
            }
            _ => tracing::info!(reason = reason.as_str(), "dropped WebSocket client"),
        }
        gateway.hub.unregister(&client);
    }
    .instrument(span)
    .await
}

async fn write(
    gateway: &Gateway,
    client: &Client,
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: tokio::sync::mpsc::Receiver<Utf8Bytes>,
) -> SplitSink<WebSocket, Message> {
    let every = gateway.config.ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + every, every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            biased;
            _ = client.killed() => break,
            frame = rx.recv() => match frame {
                Some(frame) => Message::Text(frame),
                None => break,
            },
            _ = ping.tick() => Message::Ping(Default::default()),
        };
        let batch = async {
            sink.feed(first).await?;
            for _ in 1..MAX_BATCH {
                match rx.try_recv() {
                    Ok(frame) => sink.feed(Message::Text(frame)).await?,
                    Err(_) => break,
                }
            }
            sink.flush().await
        };
        let sent = tokio::select! {
            biased;
            _ = client.killed() => break,
            sent = batch => sent,
        };
        if let Err(error) = sent {
            tracing::debug!(%error, "write failed");
            client.close(DisconnectReason::WriteError);
            break;
        }
    }
    // Whatever stopped the writer ends the connection (the reader too).
    client.close(client.reason().unwrap_or(DisconnectReason::Shutdown));
    sink
}

/// The closing handshake, bounded by [`CLOSE_GRACE`]: a close frame naming
/// the reason, then the client's close (or anything it still sends) is
/// read, so the socket is not reset under data the client has yet to read.
async fn goodbye(mut socket: WebSocket, reason: DisconnectReason) {
    let (code, text) = match reason {
        DisconnectReason::ClientClosed => (1000, "bye"),
        DisconnectReason::Shutdown => (1001, "gateway shutting down"),
        DisconnectReason::SlowClient => (1008, "slow client: send queue full"),
        DisconnectReason::PongTimeout => (1008, "no pong within the timeout"),
        DisconnectReason::ProtocolError => (1009, "frame too large or not WebSocket"),
        DisconnectReason::WriteError => return,
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(text),
        }));
        if socket.send(close).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

async fn read(
    gateway: &Gateway,
    client: &Client,
    mut stream: SplitStream<WebSocket>,
) -> SplitStream<WebSocket> {
    let timeout = gateway.config.pong_timeout;
    let check_every = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut watchdog = tokio::time::interval(check_every);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_pong = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = client.killed() => return stream,
            _ = watchdog.tick() => {
                if last_pong.elapsed() > timeout {
                    client.close(DisconnectReason::PongTimeout);
                    return stream;
                }
            }
            message = stream.next() => match message {
                None | Some(Ok(Message::Close(_))) => {
                    client.close(DisconnectReason::ClientClosed);
                    return stream;
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "read failed");
                    client.close(classify(error));
                    return stream;
                }
                Some(Ok(Message::Pong(_))) => last_pong = Instant::now(),
                // Answered by the WebSocket layer itself.
                Some(Ok(Message::Ping(_))) => {}
                Some(Ok(Message::Binary(_))) => {
                    client.offer(protocol::error(&RequestError::Binary).into());
                }
                Some(Ok(Message::Text(text))) => handle(gateway, client, &text),
            }
        }
    }
}

/// A read error that is the client's fault is a protocol error; anything
/// else (reset, EOF mid-frame) is the client going away.
fn classify(error: axum::Error) -> DisconnectReason {
    use tokio_tungstenite::tungstenite::Error as E;
    match error.into_inner().downcast::<E>() {
        Ok(e) => match *e {
            E::Capacity(_) | E::Protocol(_) | E::Utf8(_) => DisconnectReason::ProtocolError,
            _ => DisconnectReason::ClientClosed,
        },
        Err(_) => DisconnectReason::ClientClosed,
    }
}

/// Acts on one request frame; the reply is queued like any frame.
fn handle(gateway: &Gateway, client: &Client, text: &str) {
    let reply = match ClientRequest::parse(text) {
        Err(e) => protocol::error(&e),
        Ok(ClientRequest::Subscribe { metrics }) => match protocol::parse_metric_types(&metrics) {
            Ok(types) => {
                client.subscribe(&types);
                protocol::subscriptions(&client.subscription_list())
            }
            Err(e) => protocol::error(&e),
        },
        Ok(ClientRequest::Unsubscribe { metrics }) => {
            match protocol::parse_metric_types(&metrics) {
                Ok(types) => {
                    client.unsubscribe(&types);
                    protocol::subscriptions(&client.subscription_list())
                }
                Err(e) => protocol::error(&e),
            }
        }
        Ok(ClientRequest::Stats { metrics }) => {
            let only = match metrics.as_deref().map(protocol::parse_metric_types) {
                None => None,
                Some(Ok(types)) => Some(types),
                Some(Err(e)) => {
                    client.offer(protocol::error(&e).into());
                    return;
                }
            };
            let names: Option<Vec<&str>> = only
                .as_ref()
                .map(|t| t.iter().map(|m| m.as_str()).collect());
            let now = devfleet_protocol::now_ms();
            let window = gateway.config.window.window.as_secs_f64();
            let metrics = gateway.windows().summary(now, names.as_deref());
            protocol::to_text(&protocol::Stats {
                kind: "stats",
                window_seconds: window,
                timestamp: now,
                metrics,
            })
        }
    };
    client.offer(reply.into());
}
