//! The devfleet wire protocol.
//!
//! Everything that crosses a broker is a [`Envelope`] holding one [`Message`],
//! encoded as MessagePack (rmp-serde). The plan format users write lives in
//! [`plan`]; the queue and subject names every service agrees on live in
//! [`queues`]. This crate does no I/O.

pub mod envelope;
pub mod messages;
pub mod metrics;
pub mod plan;
pub mod queues;

pub use envelope::{DecodeError, EncodeError, Envelope, MAX_ENVELOPE_BYTES, SCHEMA_VERSION};
pub use messages::*;
pub use metrics::{MetricBody, MetricBodyError};
pub use plan::{
    DeploySpec, ExecutorKind, Handler, HealthSource, IntegrationStep, Plan, PlanError, TaskDef,
    Thresholds,
};

/// Milliseconds since the Unix epoch, the one clock every record and message uses.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
