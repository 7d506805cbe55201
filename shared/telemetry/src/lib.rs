//! Telemetry for every devfleet binary: logs, spans and trace propagation.
//!
//! - [`init`] installs the process-wide `tracing` subscriber once, at the top
//!   of `main`: human-readable logs on stderr (JSON lines when
//!   `DEVFLEET_LOG_FORMAT=json`) filtered by `RUST_LOG` (default `info`), and
//!   an OpenTelemetry layer that gives every span a trace context. Spans are
//!   exported over OTLP/HTTP (protobuf) only when `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; without it trace ids
//!   still exist and still cross service boundaries, they just go nowhere.
//! - [`current_traceparent`] and [`set_parent`] carry the W3C `traceparent`
//!   through message envelopes, so one plan's work forms one trace across the
//!   analyzer, scheduler, workers and router.
//! - [`init_for_tests`] is the idempotent variant for unit and integration
//!   tests.
//!
//! The OpenTelemetry layer sees spans at `INFO` and above whatever `RUST_LOG`
//! says (`RUST_LOG` only filters what is printed), so quietening the logs
//! never breaks a trace. Spans meant to carry trace context across services
//! (message handlers) must therefore be `INFO` spans or higher.
//!
//! A consumer links its handler span to the publisher's trace before the
//! span is first entered:
//!
//! ```
//! # fn handle() {}
//! # let traceparent: Option<String> = None;
//! let span = tracing::info_span!("handle", plan_id = "p-1", task_id = "t-1");
//! devfleet_telemetry::set_parent(&span, traceparent.as_deref());
//! span.in_scope(|| {
//!     // Anything published from here carries this trace.
//!     let _outgoing = devfleet_telemetry::current_traceparent();
//!     handle();
//! });
//! ```

mod propagation;
mod subscriber;

pub use propagation::{current_traceparent, parse_traceparent, set_parent, TraceParent};
pub use subscriber::{init, init_for_tests, TelemetryError, TelemetryGuard};
