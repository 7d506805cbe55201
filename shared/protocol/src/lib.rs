//! The devfleet wire protocol.
//!
//! Everything that crosses a broker is a [`Envelope`] holding one [`Message`],
//! encoded as MessagePack (rmp-serde). The plan format users write lives in
//! [`plan`]; the queue and subject names every service agrees on live in
//! [`queues`]; the metric bodies services emit live in [`metrics`]. This
//! crate does no I/O.
//!
//! # Wire compatibility
//!
//! Services are upgraded one at a time, so for a while old and new versions
//! read each other's messages. The rule that keeps that safe:
//!
//! * **Additive only.** A message body, a struct nested in one (plan, task,
//!   step, deploy spec, check, attempt) or a metric body may gain fields;
//!   every new field is `#[serde(default)]` or an `Option` (missing reads as
//!   `None`). No field is removed, renamed or retyped, and no value gets a
//!   new meaning. New message kinds and metric bodies are additions too.
//! * **Readers are lenient.** Decoding ignores fields it does not know (no
//!   `deny_unknown_fields` on anything that travels; plan *files* are
//!   checked strictly by [`Plan::parse`] instead) and defaults the ones an
//!   older writer did not send. So a new reader reads old messages, an old
//!   reader reads new ones, and nothing in flight is dead-lettered by an
//!   upgrade. A kind this build does not know is a [`DecodeError::UnknownKind`]
//!   (dead-lettered with its name): deploy consumers before the producers of
//!   a new kind.
//! * **The schema version bumps only for breaking changes** (anything the
//!   two rules above do not allow). A reader dead-letters an envelope of
//!   another version with [`DecodeError::UnsupportedVersion`], naming both.
//! * **Metrics are best effort.** A metric body that does not decode into
//!   its struct is not an error of the message: the gateway forwards and
//!   aggregates the map as it is (see [`metrics`]).
//!
//! `tests/golden.rs` pins the bytes of every message kind, the envelope
//! framing and every metric body, and checks both upgrade directions; a
//! change to a golden file is a wire change to review against this rule.

pub mod envelope;
pub mod messages;
pub mod metrics;
pub mod plan;
pub mod queues;

pub use envelope::{DecodeError, EncodeError, Envelope, MAX_ENVELOPE_BYTES, SCHEMA_VERSION};
pub use messages::*;
pub use metrics::{MetricBody, MetricBodyError};
pub use plan::{
    DeploySpec, ExecutorKind, Handler, HealthSource, IntegrationStep, Plan, PlanBudget, PlanError,
    TaskDef, Thresholds,
};

/// Cuts text to at most `max` bytes on a character boundary, keeping the
/// start (where compilers put the first error) and marking the cut with the
/// number of bytes left out. How texts that travel in messages
/// (diagnostics, errors, command output) are bounded.
pub fn trim_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n… ({} more bytes)", &text[..end], text.len() - end)
}

/// Milliseconds since the Unix epoch, the one clock every record and message uses.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimming_respects_char_boundaries_and_says_what_was_cut() {
        let s = "é".repeat(10);
        let t = trim_text(&s, 5);
        assert!(t.starts_with("éé"), "{t}");
        assert!(t.ends_with("(16 more bytes)"), "{t}");
        assert_eq!(trim_text("short", 10), "short");
    }
}
