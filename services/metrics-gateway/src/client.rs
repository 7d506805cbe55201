//! A small client of the gateway's WebSocket protocol, used by
//! `devfleet watch` and the fan-out benchmark: connect (with the token),
//! read the welcome, subscribe, and format frames for a terminal.

use devfleet_protocol::MetricType;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message;

/// A connected WebSocket.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long the handshake, the welcome and a subscription ack may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to a gateway. Variants name the URL.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid gateway URL '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot connect to the gateway at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(
        "the gateway at {url} refused the token: set DEVFLEET_GATEWAY_TOKEN to the gateway's token"
    )]
    Unauthorized { url: String },
    #[error("the gateway at {url} answered {status}: {reason}")]
    Refused {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("the gateway at {url} broke the protocol: {reason}")]
    Protocol { url: String, reason: String },
    #[error("the gateway at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("the gateway at {url} closed the connection{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed { url: String, reason: Option<String> },
}

/// The WebSocket URL for a gateway address (`DEVFLEET_GATEWAY_ADDR`):
/// `127.0.0.1:7070` → `ws://127.0.0.1:7070/ws`. A full `ws://` URL is
/// returned as it is.
pub fn url_for(addr: &str) -> String {
    if addr.starts_with("ws://") || addr.starts_with("wss://") {
        addr.to_owned()
    } else {
        format!("ws://{}/ws", addr.trim_end_matches('/'))
    }
}

/// Connects, sending `token` as a bearer token when given, and returns the
/// socket with the welcome frame.
pub async fn connect(url: &str, token: Option<&str>) -> Result<(Socket, Value), ClientError> {
    let invalid = |reason: String| ClientError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    if url.starts_with("wss://") {
        return Err(invalid(
            "wss:// is not supported; the gateway serves plain ws:// (put a TLS proxy in front)"
                .into(),
        ));
    }
    let mut request = url
        .into_client_request()
        .map_err(|e| invalid(e.to_string()))?;
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| invalid("the token contains characters not allowed in a header".into()))?;
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let timeout = |_| ClientError::Timeout {
        url: url.to_owned(),
        timeout: ANSWER_TIMEOUT,
    };
    let connected = tokio::time::timeout(ANSWER_TIMEOUT, tokio_tungstenite::connect_async(request))
        .await
        .map_err(timeout)?;
    let (mut socket, _) = connected.map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            if response.status() == StatusCode::UNAUTHORIZED {
                ClientError::Unauthorized {
                    url: url.to_owned(),
                }
            } else {
                ClientError::Refused {
                    url: url.to_owned(),
                    status: response.status().as_u16(),
                    reason: response
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                        .unwrap_or_default(),
                }
            }
        }
        other => ClientError::Connect {
            url: url.to_owned(),
            reason: other.to_string(),
        },
    })?;
    let welcome = tokio::time::timeout(ANSWER_TIMEOUT, next_frame(&mut socket, url))
        .await
        .map_err(timeout)??;
    if welcome.get("type").and_then(Value::as_str) != Some("welcome") {
        return Err(ClientError::Protocol {
            url: url.to_owned(),
            reason: format!("expected a welcome frame first, got {welcome}"),
        });
    }
    Ok((socket, welcome))
}

/// Subscribes to `metrics` and waits for the server's acknowledgement.
/// Returns the subscription set the server reports.
pub async fn subscribe(
    socket: &mut Socket,
    url: &str,
    metrics: &[MetricType],
) -> Result<Vec<String>, ClientError> {
    let request = serde_json::json!({
        "type": "subscribe",
        "metrics": metrics.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
    });
    send_text(socket, url, request.to_string()).await?;
    let ack = async {
        loop {
            let frame = next_frame(socket, url).await?;
            match frame.get("type").and_then(Value::as_str) {
                Some("subscriptions") => {
                    let set = frame
                        .get("metrics")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|m| m.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                    return Ok(set);
                }
                Some("error") => {
                    return Err(ClientError::Protocol {
                        url: url.to_owned(),
                        reason: frame
                            .get("error")
                            .and_then(Value::as_str)
                            .unwrap_or("subscription refused")
                            .to_owned(),
                    })
                }
                _ => continue,
            }
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT, ack)
        .await
        .map_err(|_| ClientError::Timeout {
            url: url.to_owned(),
            timeout: ANSWER_TIMEOUT,
        })?
}

/// Sends one text frame (a JSON request).
pub async fn send_text(socket: &mut Socket, url: &str, text: String) -> Result<(), ClientError> {
    socket
        .send(Message::text(text))
        .await
        .map_err(|e| ClientError::Closed {
            url: url.to_owned(),
            reason: Some(e.to_string()),
        })
}

/// The next JSON text frame (pings are answered while reading).
pub async fn next_frame(socket: &mut Socket, url: &str) -> Result<Value, ClientError> {
    loop {
        match socket.next().await {
            None => {
                return Err(ClientError::Closed {
                    url: url.to_owned(),
                    reason: None,
                })
            }
            Some(Err(e)) => {
                return Err(ClientError::Closed {
                    url: url.to_owned(),
                    reason: Some(e.to_string()),
                })
            }
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(text.as_str()).map_err(|e| ClientError::Protocol {
                    url: url.to_owned(),
                    reason: format!("frame is not JSON: {e}"),
                })
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(ClientError::Closed {
                    url: url.to_owned(),
                    reason: frame.map(|f| format!("{} ({})", f.reason, u16::from(f.code))),
                })
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// One line for a terminal: time (UTC), metric type, source, then the data
/// as `key=value` (event, plan and path first).
pub fn format_frame(frame: &Value) -> String {
    let kind = frame.get("type").and_then(Value::as_str).unwrap_or("?");
    match kind {
        "metric" => {
            let ts = frame.get("timestamp").and_then(Value::as_i64).unwrap_or(0);
            let metric_type = frame
                .get("metric_type")
                .and_then(Value::as_str)
                .unwrap_or("?");
            let source = frame.get("source").and_then(Value::as_str).unwrap_or("?");
            let mut line = format!("{}  {metric_type:<13}  {source}", clock(ts));
            if let Some(Value::Object(data)) = frame.get("data") {
                let first = ["event", "plan_id", "path"];
                let ordered = first
                    .iter()
                    .filter_map(|k| data.get(*k).map(|v| (*k, v)))
                    .chain(
                        data.iter()
                            .filter(|(k, _)| !first.contains(&k.as_str()))
                            .map(|(k, v)| (k.as_str(), v)),
                    );
                for (k, v) in ordered {
                    if v.is_null() {
                        continue;
                    }
                    line.push_str(&format!("  {k}={}", short(v)));
                }
            }
            line
        }
        "stats" => {
            let mut line = String::from("stats:");
            if let Some(Value::Object(types)) = frame.get("metrics") {
                for (t, s) in types {
                    line.push_str(&format!(
                        " {t}={}",
                        s.get("count").and_then(Value::as_u64).unwrap_or(0)
                    ));
                }
            }
            line
        }
        _ => frame.to_string(),
    }
}

fn short(v: &Value) -> String {
    match v {
        Value::String(s) if !s.is_empty() && !s.contains(char::is_whitespace) => s.clone(),
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// `HH:MM:SS.mmm` (UTC) of a millisecond timestamp.
fn clock(ms: i64) -> String {
    let day_ms = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_from_addresses() {
        assert_eq!(url_for("127.0.0.1:7070"), "ws://127.0.0.1:7070/ws");
        assert_eq!(url_for("ws://h:1/ws"), "ws://h:1/ws");
    }

    #[test]
    fn metric_lines_put_the_ids_first() {
        let line = format_frame(&json!({
            "type": "metric",
            "metric_type": "task_progress",
            "timestamp": 3_723_004,
            "source": "scheduler@x",
            "data": { "total": 3, "path": "a.py", "event": "task.done", "note": "two words", "n": null },
        }));
        assert_eq!(
            line,
            "01:02:03.004  task_progress  scheduler@x  event=task.done  path=a.py  note=\"two words\"  total=3"
        );
    }
}
