//! The dead-letter queue on NATS: copies with their [`DeadLetterInfo`] in
//! headers, and the mover for messages JetStream stopped delivering.
//!
//! A dead-lettered copy is an ordinary message of [`DEAD_LETTER_QUEUE`]
//! whose headers say where it came from and why:
//! `Devfleet-Dlq-Queue`, `Devfleet-Dlq-Reason` (line breaks become spaces,
//! cut at [`MAX_REASON_BYTES`]), `Devfleet-Dlq-Attempts` and
//! `Devfleet-Dlq-At-Ms`. Its `Nats-Msg-Id` names the original (queue and
//! stream sequence), so a message dead-lettered twice within the server's
//! duplicate window is stored once.
//!
//! A message that reached the durable's `max_deliver` is never delivered
//! again; the server announces it on
//! `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`. Every
//! consumer runs a mover listening there in one queue group, so one of them
//! copies the message to the dead-letter queue with the reason
//! "exceeded max deliveries" and deletes it from its queue. The server
//! sends that advisory only while someone listens, so a message that hits
//! the limit while no consumer of its queue runs stays in its stream,
//! undelivered (best effort, logged by nobody).

use super::{backoff, stream_name, Inner, CONSUMER};
use crate::{dead_letter_queue_for, BusResult, DeadLetterInfo};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures::StreamExt;
use std::str::FromStr;
use std::sync::Arc;
use tokio::task::JoinHandle;

const QUEUE: &str = "Devfleet-Dlq-Queue";
const REASON: &str = "Devfleet-Dlq-Reason";
const ATTEMPTS: &str = "Devfleet-Dlq-Attempts";
const AT_MS: &str = "Devfleet-Dlq-At-Ms";
/// Longest reason kept in a header, in bytes.
const MAX_REASON_BYTES: usize = 4096;
/// Queue group of the movers: one of them handles each advisory.
const MOVER_GROUP: &str = "devfleet-dlq-mover";
/// Tries at moving one message before giving up on it.
const MOVE_TRIES: u32 = 8;

/// The message id of the dead-letter copy of message `sequence` of `queue`.
pub(super) fn message_id(queue: &str, sequence: u64) -> String {
    format!("dlq:{queue}:{sequence}")
}

/// Stores a copy of `payload` in the dead-letter queue with `info`, waiting
/// for the PubAck (retried through a reconnect like any publish).
pub(super) async fn store(
    inner: &Inner,
    info: &DeadLetterInfo,
    message_id: &str,
    payload: Bytes,
) -> BusResult<()> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", header_value(message_id));
    headers.insert(QUEUE, header_value(&info.queue));
    headers.insert(REASON, header_value(&info.reason));
    headers.insert(ATTEMPTS, info.attempts.to_string().as_str());
    headers.insert(AT_MS, info.at_ms.to_string().as_str());
    inner
        .publish_confirmed(&dead_letter_queue_for(&info.queue), headers, payload)
        .await
}

/// The [`DeadLetterInfo`] in a message's headers, if it is a dead-letter
/// copy.
pub(super) fn info_from_headers(headers: Option<&HeaderMap>) -> Option<DeadLetterInfo> {
    let headers = headers?;
    let text = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    Some(DeadLetterInfo {
        queue: text(QUEUE)?,
        reason: text(REASON).unwrap_or_default(),
        attempts: text(ATTEMPTS)
            .and_then(|v| v.parse().ok())
            .unwrap_or_default(),
        at_ms: text(AT_MS).and_then(|v| v.parse().ok()).unwrap_or_default(),
    })
}

/// `text` as a header value: line breaks (which headers cannot hold)
/// become spaces, and it is cut to [`MAX_REASON_BYTES`].
fn header_value(text: &str) -> HeaderValue {
    let mut end = text.len().min(MAX_REASON_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let clean = text[..end].replace(['\r', '\n'], " ");
    HeaderValue::from_str(&clean).unwrap_or_default()
}

/// Starts the mover for `queue` (see the module docs): subscribes now,
/// then runs until aborted or the bus closes.
pub(super) async fn start_mover(
    inner: Arc<Inner>,
    queue: String,
) -> Result<JoinHandle<()>, String> {
    let subject = format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{CONSUMER}",
        stream_name(&queue)
    );
    let mut advisories = inner
        .client
        .queue_subscribe(subject, MOVER_GROUP.to_owned())
        .await
        .map_err(|e| format!("listening for max-deliveries advisories: {e}"))?;
    Ok(tokio::spawn(async move {
        // The client renews the subscription after a reconnect; it ends
        // only when the client closes.
        loop {
            let advisory = tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                advisory = advisories.next() => advisory,
            };
            let Some(advisory) = advisory else { return };
            let Some(sequence) = json_u64(&advisory.payload, "stream_seq") else {
                tracing::warn!(%queue, "nats: max-deliveries advisory without stream_seq");
                continue;
            };
            let deliveries = json_u64(&advisory.payload, "deliveries").unwrap_or_default();
            move_message(&inner, &queue, sequence, deliveries).await;
        }
    }))
}

/// Copies message `sequence` of `queue` to the dead-letter queue and
/// deletes it, retrying for a while (the server may be restarting).
async fn move_message(inner: &Inner, queue: &str, sequence: u64, deliveries: u64) {
    let info = DeadLetterInfo {
        queue: queue.to_owned(),
        reason: format!("exceeded max deliveries ({deliveries})"),
        attempts: u32::try_from(deliveries).unwrap_or(u32::MAX),
        at_ms: devfleet_protocol::now_ms(),
    };
    for tries in 1..=MOVE_TRIES {
        match try_move(inner, queue, sequence, &info).await {
            Ok(()) => {
                tracing::warn!(
                    queue,
                    sequence,
                    deliveries,
                    "nats: moved a message that exceeded max deliveries to the dead-letter queue"
                );
                return;
            }
            Err(reason) => {
                tracing::debug!(queue, sequence, %reason, "nats: moving to the dead-letter queue failed");
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff(tries)) => {}
                }
            }
        }
    }
    tracing::error!(
        queue,
        sequence,
        "nats: could not move a message that exceeded max deliveries; it stays in its stream"
    );
}

async fn try_move(
    inner: &Inner,
    queue: &str,
    sequence: u64,
    info: &DeadLetterInfo,
) -> Result<(), String> {
    let stream = inner.stream(queue).await?;
    let message = match stream.get_raw_message(sequence).await {
        Ok(message) => message,
        Err(e) => {
            use async_nats::jetstream::stream::RawMessageErrorKind as Kind;
            return match e.kind() {
                // Someone else moved it already.
                Kind::NoMessageFound => Ok(()),
                _ => Err(format!("reading message {sequence}: {e}")),
            };
        }
    };
    store(inner, info, &message_id(queue, sequence), message.payload)
        .await
        .map_err(|e| e.to_string())?;
    match stream.delete_message(sequence).await {
        Ok(_) => Ok(()),
        Err(e) => {
            use async_nats::jetstream::stream::DeleteMessageErrorKind as Kind;
            match e.kind() {
                // Deleted meanwhile by another mover counts as done.
                Kind::JetStream(error)
                    if error.error_code() == async_nats::jetstream::ErrorCode::NO_MESSAGE_FOUND =>
                {
                    Ok(())
                }
                _ => Err(format!("deleting message {sequence}: {e}")),
            }
        }
    }
}

/// The unsigned number in field `key` of a flat JSON object, as the
/// server's advisories carry them; `None` if absent or not a number.
fn json_u64(json: &[u8], key: &str) -> Option<u64> {
    let text = std::str::from_utf8(json).ok()?;
    let quoted = format!("\"{key}\"");
    let after = &text[text.find(&quoted)? + quoted.len()..];
    let after = after.trim_start().strip_prefix(':')?.trim_start();
    let digits: &str = &after[..after
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after.len())];
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_fields_parse() {
        let advisory = br#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x","timestamp":"2024-01-01T00:00:00Z","stream":"S","consumer":"workers","stream_seq": 42,"deliveries":20}"#;
        assert_eq!(json_u64(advisory, "stream_seq"), Some(42));
        assert_eq!(json_u64(advisory, "deliveries"), Some(20));
        assert_eq!(json_u64(advisory, "missing"), None);
        assert_eq!(json_u64(advisory, "stream"), None);
    }

    #[test]
    fn header_values_lose_line_breaks_and_length() {
        assert_eq!(header_value("a\r\nb").as_str(), "a  b");
        let long = "é".repeat(MAX_REASON_BYTES);
        assert!(header_value(&long).as_str().len() <= MAX_REASON_BYTES);
    }

    #[test]
    fn info_round_trips_through_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(QUEUE, "work.dev");
        headers.insert(REASON, "bad input");
        headers.insert(ATTEMPTS, "3");
        headers.insert(AT_MS, "1700000000000");
        let info = info_from_headers(Some(&headers)).expect("a dead-letter copy");
        assert_eq!(info.queue, "work.dev");
        assert_eq!(info.reason, "bad input");
        assert_eq!(info.attempts, 3);
        assert_eq!(info.at_ms, 1_700_000_000_000);
        assert!(info_from_headers(Some(&HeaderMap::new())).is_none());
        assert!(info_from_headers(None).is_none());
    }
}
