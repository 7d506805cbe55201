//! W3C trace context (`traceparent`) across message envelopes.
//!
//! Parsing and formatting go through OpenTelemetry's `TraceContextPropagator`,
//! so version, length, hex and all-zero-id rules are the specification's, not
//! ours. Only `traceparent` travels: envelopes have no `tracestate` field.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and carrier key) name.
const TRACEPARENT: &str = "traceparent";

/// The ids carried by a valid `traceparent` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id: 32 lowercase hex digits, shared by every span of a trace.
    pub trace_id: String,
    /// The parent span's id: 16 lowercase hex digits.
    pub span_id: String,
    /// Whether the sender sampled (recorded) the trace.
    pub sampled: bool,
}

/// The `traceparent` of the current span, to put in an outgoing envelope.
///
/// `None` when no span is current, when telemetry is not installed, or when
/// the span is not one the OpenTelemetry layer tracks (below `INFO`, in which
/// case the nearest entered `INFO`+ span's context is used if there is one).
/// Works without an OTLP endpoint: ids are assigned whether or not spans are
/// exported.
///
/// Calling this starts the current span's OpenTelemetry span, so a later
/// [`set_parent`] on that span has no effect.
pub fn current_traceparent() -> Option<String> {
    let mut cx = tracing::Span::current().context();
    if !has_valid_span(&cx) {
        // The current tracing span may be one the OpenTelemetry layer filters
        // out; the layer activates the context of every span it does track on
        // entry, so the nearest tracked ancestor is the current context.
        cx = Context::current();
    }
    if !has_valid_span(&cx) {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span named by `traceparent` (from an
/// incoming envelope), so the handler's work joins the publisher's trace.
///
/// Call it right after creating the span and before it is first entered
/// (with `#[tracing::instrument]`, create the span by hand instead and use
/// `.instrument(span)`). An absent or invalid header, a span that has already
/// started, or a span below `INFO` leaves the span as it was: it then starts
/// a trace of its own. Returns whether the remote parent was attached.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) -> bool {
    let Some(remote) = traceparent.and_then(remote_context) else {
        return false;
    };
    match span.set_parent(remote) {
        Ok(()) => true,
        Err(error) => {
            tracing::debug!(%error, "remote trace context not attached");
            false
        }
    }
}

/// Validates a `traceparent` header and returns its ids, or `None` if it is
/// not a valid W3C trace context (wrong version/format, or all-zero ids).
pub fn parse_traceparent(traceparent: &str) -> Option<TraceParent> {
    let cx = remote_context(traceparent)?;
    let span = cx.span();
    let span_context = span.span_context();
    Some(TraceParent {
        trace_id: span_context.trace_id().to_string(),
        span_id: span_context.span_id().to_string(),
        sampled: span_context.is_sampled(),
    })
}

/// The remote context a valid `traceparent` describes.
fn remote_context(traceparent: &str) -> Option<Context> {
    let traceparent = traceparent.trim();
    if !has_w3c_field_widths(traceparent) {
        return None;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    has_valid_span(&cx).then_some(cx)
}

/// Whether the first four fields have the widths the specification fixes
/// (2, 32, 16 and 2 characters). The propagator checks everything else but
/// accepts short ids (it zero-pads them), and a truncated id would silently
/// name a different trace.
fn has_w3c_field_widths(traceparent: &str) -> bool {
    let mut fields = traceparent.split('-');
    [2, 32, 16, 2]
        .into_iter()
        .all(|width| fields.next().is_some_and(|field| field.len() == width))
}

fn has_valid_span(cx: &Context) -> bool {
    cx.span().span_context().is_valid()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init_for_tests;

    /// The example from the W3C Trace Context specification.
    const W3C_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn traceparent_of(span: &tracing::Span) -> TraceParent {
        let header = span
            .in_scope(current_traceparent)
            .expect("an INFO span has a trace context once telemetry is installed");
        parse_traceparent(&header).expect("current_traceparent produces valid headers")
    }

    #[test]
    fn parses_the_specification_example() {
        let parsed = parse_traceparent(W3C_EXAMPLE).unwrap();
        assert_eq!(parsed.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.span_id, "00f067aa0ba902b7");
        assert!(parsed.sampled);
    }

    #[test]
    fn rejects_malformed_headers() {
        for garbage in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn child_created_from_parent_traceparent_shares_its_trace_id() {
        init_for_tests();
        let parent = tracing::info_span!("publisher");
        let header = parent.in_scope(current_traceparent).unwrap();

        // A root span, as a consumer in another process would create.
        let child = tracing::info_span!(parent: None, "consumer");
        assert!(set_parent(&child, Some(&header)));

        let parent_ids = parse_traceparent(&header).unwrap();
        let child_ids = traceparent_of(&child);
        assert_eq!(child_ids.trace_id, parent_ids.trace_id);
        assert_ne!(child_ids.span_id, parent_ids.span_id);
    }

    #[test]
    fn remote_parent_from_another_process_is_adopted() {
        init_for_tests();
        let span = tracing::info_span!(parent: None, "consumer");
        assert!(set_parent(&span, Some(W3C_EXAMPLE)));
        assert_eq!(
            traceparent_of(&span).trace_id,
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn spans_without_a_remote_parent_start_separate_traces() {
        init_for_tests();
        let first = traceparent_of(&tracing::info_span!(parent: None, "one"));
        let second = traceparent_of(&tracing::info_span!(parent: None, "two"));
        assert_ne!(first.trace_id, second.trace_id);
    }

    #[test]
    fn garbage_or_absent_traceparent_is_ignored() {
        init_for_tests();
        for header in [None, Some(""), Some("garbage"), Some("00-zz-zz-01")] {
            let span = tracing::info_span!(parent: None, "consumer");
            assert!(!set_parent(&span, header), "{header:?}");
            // The span still gets a trace of its own.
            let _ = traceparent_of(&span);
        }
    }

    #[test]
    fn set_parent_after_the_span_started_is_a_no_op() {
        init_for_tests();
        let span = tracing::info_span!(parent: None, "already-running");
        let before = traceparent_of(&span);
        assert!(!set_parent(&span, Some(W3C_EXAMPLE)));
        assert_eq!(traceparent_of(&span), before);
    }

    #[test]
    fn debug_span_inherits_the_nearest_traced_ancestor() {
        init_for_tests();
        let handler = tracing::info_span!(parent: None, "handler");
        let expected = traceparent_of(&handler).trace_id;
        let inner = handler.in_scope(|| {
            tracing::debug_span!("detail")
                .in_scope(current_traceparent)
                .and_then(|header| parse_traceparent(&header))
        });
        assert_eq!(inner.map(|ids| ids.trace_id), Some(expected));
    }

    #[test]
    fn no_traceparent_outside_any_span() {
        init_for_tests();
        assert_eq!(current_traceparent(), None);
    }
}
