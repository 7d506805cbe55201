//! The MessagePack envelope every message travels in.
//!
//! Wire layout (a MessagePack map with named fields): `v` schema version,
//! `id` message id, `kind`, `plan_id`, `task_id`, `attempt`, `ts` (ms since
//! epoch), `traceparent` (W3C), `body` (the message, itself MessagePack, as
//! bytes). The body is nested as bytes so the header can be read, and the
//! version checked, before the body is trusted.

use crate::messages::Message;
use serde::{Deserialize, Serialize};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u16 = 1;

/// Largest encoded envelope accepted, in bytes.
pub const MAX_ENVELOPE_BYTES: usize = 16 * 1024 * 1024;

/// A message with its routing and tracing header.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub version: u16,
    /// Unique per publish; consumers use it to spot duplicates in logs.
    pub id: String,
    pub plan_id: Option<String>,
    pub task_id: Option<String>,
    pub attempt: u32,
    pub timestamp_ms: i64,
    /// W3C trace context of the span that published this message.
    pub traceparent: Option<String>,
    pub message: Message,
}

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    v: u16,
    id: String,
    kind: String,
    #[serde(default)]
    plan_id: Option<String>,
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    attempt: u32,
    ts: i64,
    #[serde(default)]
    traceparent: Option<String>,
    #[serde(with = "serde_bytes", borrow)]
    body: std::borrow::Cow<'a, [u8]>,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u16,
}

/// Why bytes could not be turned into an [`Envelope`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is empty")]
    Empty,
    #[error("message is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("message is truncated: {0}")]
    Truncated(String),
    #[error("message is not a devfleet envelope: {0}")]
    Malformed(String),
    #[error(
        "envelope schema version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("unknown message kind '{kind}'")]
    UnknownKind { kind: String },
    #[error("body of '{kind}' message does not decode: {error}")]
    Body { kind: String, error: String },
}

/// Why an [`Envelope`] could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("encoding '{kind}' failed: {error}")]
    Serialize { kind: &'static str, error: String },
    #[error("encoded '{kind}' message is {size} bytes; the limit is {limit}")]
    TooLarge {
        kind: &'static str,
        size: usize,
        limit: usize,
    },
}

fn classify(err: rmp_serde::decode::Error) -> DecodeError {
    use rmp_serde::decode::Error as E;
    let eof = |e: &std::io::Error| e.kind() == std::io::ErrorKind::UnexpectedEof;
    match &err {
        E::InvalidMarkerRead(e) | E::InvalidDataRead(e) if eof(e) => {
            DecodeError::Truncated(err.to_string())
        }
        E::LengthMismatch(_) => DecodeError::Truncated(err.to_string()),
        _ => DecodeError::Malformed(err.to_string()),
    }
}

impl Envelope {
    /// Wraps a message with a fresh id and timestamp; plan, task and attempt
    /// are taken from the message.
    pub fn new(message: impl Into<Message>) -> Self {
        let message = message.into();
        let (plan_id, task_id) = message.ids();
        Envelope {
            version: SCHEMA_VERSION,
            id: uuid::Uuid::new_v4().to_string(),
            plan_id: plan_id.map(str::to_owned),
            task_id: task_id.map(str::to_owned),
            attempt: message.attempt(),
            timestamp_ms: crate::now_ms(),
            traceparent: None,
            message,
        }
    }

    /// Sets the W3C traceparent.
    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// The message kind, e.g. `task.built`.
    pub fn kind(&self) -> &'static str {
        self.message.kind()
    }

    /// Encodes to MessagePack.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let kind = self.kind();
        let ser = |e: rmp_serde::encode::Error| EncodeError::Serialize {
            kind,
            error: e.to_string(),
        };
        let body = self.message.encode_body().map_err(ser)?;
        let wire = Wire {
            v: self.version,
            id: self.id.clone(),
            kind: kind.to_owned(),
            plan_id: self.plan_id.clone(),
            task_id: self.task_id.clone(),
            attempt: self.attempt,
            ts: self.timestamp_ms,
            traceparent: self.traceparent.clone(),
            body: std::borrow::Cow::Owned(body),
        };
        let bytes = rmp_serde::to_vec_named(&wire).map_err(ser)?;
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EncodeError::TooLarge {
                kind,
                size: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Decodes MessagePack. Never panics; every failure is a typed error
    /// that says what is wrong, so the consumer can dead-letter it.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        let probe: VersionProbe = rmp_serde::from_slice(bytes).map_err(classify)?;
        if probe.v != SCHEMA_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: probe.v,
                supported: SCHEMA_VERSION,
            });
        }
        let wire: Wire<'_> = rmp_serde::from_slice(bytes).map_err(classify)?;
        let message = match Message::decode_body(&wire.kind, &wire.body) {
            None => return Err(DecodeError::UnknownKind { kind: wire.kind }),
            Some(Err(e)) => {
                return Err(DecodeError::Body {
                    kind: wire.kind,
                    error: e.to_string(),
                })
            }
            Some(Ok(m)) => m,
        };
        Ok(Envelope {
            version: wire.v,
            id: wire.id,
            plan_id: wire.plan_id,
            task_id: wire.task_id,
            attempt: wire.attempt,
            timestamp_ms: wire.ts,
            traceparent: wire.traceparent,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;
    use proptest::prelude::*;

    fn built(path: String, attempt: u32, artifact: String) -> Message {
        Message::TaskBuilt(TaskBuilt {
            plan_id: "p1".into(),
            path,
            attempt,
            artifact,
            cache_hit: attempt.is_multiple_of(2),
            executor: "builtin".into(),
            duration_ms: attempt as u64 * 7,
            reannounced: attempt.is_multiple_of(3),
        })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (".*", any::<u32>(), "[a-f0-9]{0,64}").prop_map(|(p, a, h)| built(p, a, h)),
            (".*", any::<u32>(), any::<bool>(), ".*").prop_map(|(p, a, r, e)| {
                Message::TaskFailed(TaskFailed {
                    plan_id: "p".into(),
                    path: p,
                    attempt: a,
                    stage: Stage::Qa,
                    error: e,
                    retryable: r,
                })
            }),
            (".*", any::<u32>(), prop::bool::ANY).prop_map(|(p, a, fix)| {
                Message::TaskWork(TaskWork {
                    plan_id: "p".into(),
                    path: p,
                    attempt: a,
                    class: if fix { TaskClass::Fix } else { TaskClass::New },
                })
            }),
            (".*", any::<i64>(), any::<f64>()).prop_map(|(s, n, f)| {
                Message::Metric(Metric {
                    metric_type: MetricType::Performance,
                    source: s,
                    data: serde_json::json!({"n": n, "f": if f.is_finite() { f } else { 0.0 }}),
                })
            }),
        ]
    }

    proptest! {
        #[test]
        fn envelopes_round_trip(msg in arb_message(), tp in proptest::option::of("00-[0-9a-f]{32}-[0-9a-f]{16}-01")) {
            let env = Envelope::new(msg).with_traceparent(tp);
            let bytes = env.encode().unwrap();
            let back = Envelope::decode(&bytes).unwrap();
            prop_assert_eq!(back, env);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Envelope::decode(&bytes);
        }

        #[test]
        fn every_truncation_is_an_error(cut in 0usize..1000) {
            let bytes = Envelope::new(built("a/b.py".into(), 3, "ff".repeat(32))).encode().unwrap();
            let cut = cut % bytes.len();
            prop_assert!(Envelope::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn header_carries_ids_from_the_message() {
        let env = Envelope::new(built("x.py".into(), 2, "aa".into()));
        assert_eq!(env.plan_id.as_deref(), Some("p1"));
        assert_eq!(env.task_id.as_deref(), Some("x.py"));
        assert_eq!(env.attempt, 2);
        assert_eq!(env.kind(), "task.built");
    }

    #[test]
    fn truncated_input_is_a_truncation_error() {
        let bytes = Envelope::new(built("x.py".into(), 1, "aa".into()))
            .encode()
            .unwrap();
        let err = Envelope::decode(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated(_)), "{err:?}");
    }

    #[test]
    fn wrong_version_is_named() {
        let mut env = Envelope::new(built("x.py".into(), 1, "aa".into()));
        env.version = 9;
        let err = Envelope::decode(&env.encode().unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::UnsupportedVersion {
                    found: 9,
                    supported: 1
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("version 9"));
    }

    #[test]
    fn garbage_is_malformed() {
        for garbage in [
            &b"hello world"[..],
            &[0xc1, 0x00][..],
            &[0x92, 0x01, 0x02][..],
        ] {
            let err = Envelope::decode(garbage).unwrap_err();
            assert!(
                matches!(err, DecodeError::Malformed(_) | DecodeError::Truncated(_)),
                "{garbage:?}: {err:?}"
            );
        }
        assert!(matches!(Envelope::decode(&[]), Err(DecodeError::Empty)));
    }

    #[test]
    fn unknown_kind_and_bad_body_are_named() {
        let wire = Wire {
            v: SCHEMA_VERSION,
            id: "1".into(),
            kind: "task.teleported".into(),
            plan_id: None,
            task_id: None,
            attempt: 0,
            ts: 0,
            traceparent: None,
            body: std::borrow::Cow::Owned(vec![0x80]),
        };
        let bytes = rmp_serde::to_vec_named(&wire).unwrap();
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(DecodeError::UnknownKind { kind }) if kind == "task.teleported"
        ));
        let wire = Wire {
            kind: "task.built".into(),
            ..wire
        };
        let bytes = rmp_serde::to_vec_named(&wire).unwrap();
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(DecodeError::Body { kind, .. }) if kind == "task.built"
        ));
    }

    #[test]
    fn oversize_input_is_refused_before_parsing() {
        let big = vec![0u8; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(
            Envelope::decode(&big),
            Err(DecodeError::TooLarge { .. })
        ));
    }
}
