//! The WebSocket protocol of `ws://ADDR/ws`: JSON text frames.
//!
//! Client → server: `subscribe`, `unsubscribe` (with `metrics`, a list of
//! metric type names) and `stats` (optional `metrics` filter). Server →
//! client: `welcome` (first frame), `subscriptions` (the current set, after
//! each subscribe/unsubscribe), `metric` (only for subscribed types),
//! `stats` and `error` (a request the server could not act on; the
//! connection stays open). See docs/GATEWAY.md for examples.

use crate::window::TypeSummary;
use devfleet_protocol::MetricType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientRequest {
    /// Adds metric types to the subscription set.
    Subscribe { metrics: Vec<String> },
    /// Removes metric types from the subscription set.
    Unsubscribe { metrics: Vec<String> },
    /// Asks for the windowed statistics (all types, or `metrics` only).
    Stats {
        #[serde(default)]
        metrics: Option<Vec<String>>,
    },
}

/// Why a client frame was not acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("frame is not a valid request: {0}")]
    Invalid(String),
    #[error("unknown metric type '{name}' (expected one of {expected})")]
    UnknownMetric { name: String, expected: String },
    #[error("'metrics' must name at least one metric type")]
    EmptyMetrics,
    #[error("binary frames are not part of the protocol; send JSON text frames")]
    Binary,
}

impl ClientRequest {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<Self, RequestError> {
        serde_json::from_str(text).map_err(|e| RequestError::Invalid(e.to_string()))
    }
}

/// Parses metric type names, naming the first unknown one.
pub fn parse_metric_types(names: &[String]) -> Result<Vec<MetricType>, RequestError> {
    if names.is_empty() {
        return Err(RequestError::EmptyMetrics);
    }
    names
        .iter()
        .map(|n| {
            n.parse::<MetricType>()
                .map_err(|_| RequestError::UnknownMetric {
                    name: n.clone(),
                    expected: MetricType::ALL
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        })
        .collect()
}

/// The first frame of every connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    #[serde(rename = "type")]
    pub kind: String,
    pub connection_id: String,
    pub server: String,
    pub version: String,
    /// Every metric type a client may subscribe to.
    pub metric_types: Vec<String>,
    pub ping_interval_seconds: f64,
    pub pong_timeout_seconds: f64,
    /// Frames the server queues for this client before dropping it as slow.
    pub max_queued_frames: usize,
    pub max_frame_bytes: usize,
}

/// The current subscription set, sent after each subscribe/unsubscribe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subscriptions {
    #[serde(rename = "type")]
    pub kind: String,
    pub metrics: Vec<String>,
}

/// Windowed statistics.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub window_seconds: f64,
    pub timestamp: i64,
    /// Per metric type: sample count and per numeric field
    /// count/avg/min/max/p50/p95/p99.
    pub metrics: BTreeMap<String, TypeSummary>,
}

/// A request the server did not act on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorFrame {
    #[serde(rename = "type")]
    pub kind: String,
    pub error: String,
}

/// One pushed sample.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricFrame {
    #[serde(rename = "type")]
    pub kind: String,
    pub metric_type: String,
    /// Milliseconds since the Unix epoch, when the sample was taken.
    pub timestamp: i64,
    /// The service instance that sent it, or `event` for pipeline events.
    pub source: String,
    pub data: serde_json::Value,
    /// The W3C trace id of the work this sample is about, when it carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// Serializes a frame (never fails for these types; an empty object if it did).
pub(crate) fn to_text<T: Serialize>(frame: &T) -> String {
    serde_json::to_string(frame).unwrap_or_else(|_| "{}".to_owned())
}

pub(crate) fn subscriptions(set: &[MetricType]) -> String {
    to_text(&Subscriptions {
        kind: "subscriptions".into(),
        metrics: set.iter().map(|m| m.as_str().to_owned()).collect(),
    })
}

pub(crate) fn error(error: &RequestError) -> String {
    to_text(&ErrorFrame {
        kind: "error".into(),
        error: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_requests() {
        assert_eq!(
            ClientRequest::parse(r#"{"type":"subscribe","metrics":["error"]}"#),
            Ok(ClientRequest::Subscribe {
                metrics: vec!["error".into()]
            })
        );
        assert_eq!(
            ClientRequest::parse(r#"{"type":"unsubscribe","metrics":["error"]}"#),
            Ok(ClientRequest::Unsubscribe {
                metrics: vec!["error".into()]
            })
        );
        assert_eq!(
            ClientRequest::parse(r#"{"type":"stats"}"#),
            Ok(ClientRequest::Stats { metrics: None })
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let err = ClientRequest::parse(r#"{"type":"teleport"}"#).unwrap_err();
        assert!(err.to_string().contains("teleport"), "{err}");
        assert!(ClientRequest::parse("not json").is_err());
        let err = parse_metric_types(&["error".into(), "bogus".into()]).unwrap_err();
        assert!(err.to_string().contains("'bogus'"), "{err}");
        assert!(err.to_string().contains("task_progress"), "{err}");
        assert_eq!(parse_metric_types(&[]), Err(RequestError::EmptyMetrics));
    }
}
