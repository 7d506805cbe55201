//! Installing the process-wide subscriber: the log layer, the OpenTelemetry
//! layer, and the tracer provider that optionally exports spans over OTLP.

use std::io::IsTerminal;
use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::{self, MakeWriter, TestWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Filter for the printed logs, `tracing-subscriber` `EnvFilter` syntax.
const LOG_FILTER_VAR: &str = "RUST_LOG";
/// `text` (default) or `json`.
const LOG_FORMAT_VAR: &str = "DEVFLEET_LOG_FORMAT";
/// Base URL of an OTLP/HTTP collector; `/v1/traces` is appended.
const OTLP_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Full URL of the collector's traces endpoint, used as is.
const OTLP_TRACES_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// The spans the OpenTelemetry layer tracks, independent of `RUST_LOG` so
/// that quiet logs never cut a trace in two.
const TRACE_LEVEL: LevelFilter = LevelFilter::INFO;

/// Instrumentation scope reported with every span.
const TRACER_NAME: &str = "devfleet";

/// Why [`init`] could not install telemetry. Each variant names the
/// environment variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` is not a valid filter.
    #[error("invalid log filter in {variable}: {source}")]
    InvalidLogFilter {
        /// The variable that holds the filter.
        variable: &'static str,
        /// What the filter parser rejected.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// `DEVFLEET_LOG_FORMAT` is neither `text` nor `json`.
    #[error("invalid log format {value:?} in {variable}: expected `text` or `json`")]
    InvalidLogFormat {
        /// The variable that holds the format.
        variable: &'static str,
        /// The rejected value.
        value: String,
    },
    /// The OTLP exporter could not be built (typically a malformed endpoint
    /// URL or an unsupported `OTEL_EXPORTER_OTLP_PROTOCOL`).
    #[error("building the OTLP span exporter configured by {variable}: {source}")]
    Exporter {
        /// The variable that asked for export.
        variable: &'static str,
        /// The exporter's own error.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Keeps span export alive; dropping it flushes buffered spans and shuts the
/// exporter down (blocking for at most a few seconds if the collector is
/// slow or gone).
///
/// Hold it in `main` for the life of the process. After it is dropped, logs
/// are still printed but spans no longer get trace contexts. A guard from a
/// repeated [`init`] is inactive and dropping it does nothing.
#[must_use = "dropping the guard shuts span export down"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    fn inactive() -> Self {
        Self { provider: None }
    }

    /// Whether this guard owns the installed subscriber's tracer provider
    /// (false for the guard of a repeated [`init`]).
    pub fn is_active(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "flushing spans at shutdown failed");
            }
        }
    }
}

/// Installs logging and tracing for the process, naming it `service` in
/// exported spans (the OpenTelemetry `service.name` resource attribute).
///
/// Reads `RUST_LOG` (log filter, default `info`), `DEVFLEET_LOG_FORMAT`
/// (`text`, the default, or `json`) and `OTEL_EXPORTER_OTLP_ENDPOINT` /
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (export spans over OTLP/HTTP with
/// protobuf when either is set; the other standard `OTEL_EXPORTER_OTLP_*`
/// variables such as headers and timeout are honoured by the exporter).
/// Records from the `log` crate are routed into the same output.
///
/// Only the first call in a process installs anything: later calls (several
/// services embedded in one process, tests) return `Ok` with an inactive
/// guard and leave the first configuration in place. Errors name the
/// environment variable that is wrong; nothing is installed then.
pub fn init(service: &str) -> Result<TelemetryGuard, TelemetryError> {
    if tracing::dispatcher::has_been_set() {
        return Ok(TelemetryGuard::inactive());
    }
    let settings = Settings::from_env()?;
    install(
        service,
        settings,
        std::io::stderr,
        std::io::stderr().is_terminal(),
    )
}

/// Installs a test-friendly subscriber once per process; every later call
/// (and any call after [`init`]) does nothing.
///
/// Logs go through the test harness's captured output, filtered by
/// `RUST_LOG` (default `info`; an invalid value falls back to the default
/// rather than failing the test). Spans get trace contexts so propagation
/// can be tested, but nothing is ever exported.
pub fn init_for_tests() {
    // A static is never dropped, so the provider lives as long as the
    // process and spans keep their trace contexts in every test.
    static GUARD: OnceLock<TelemetryGuard> = OnceLock::new();
    GUARD.get_or_init(|| {
        let settings = Settings {
            filter: log_filter(env_var(LOG_FILTER_VAR).as_deref())
                .unwrap_or_else(|_| EnvFilter::new("info")),
            format: LogFormat::parse(env_var(LOG_FORMAT_VAR).as_deref()).unwrap_or(LogFormat::Text),
            export: false,
        };
        // Without export, building cannot fail; an error would only mean
        // less output in tests, never a reason to panic.
        install("devfleet-test", settings, TestWriter::new(), false)
            .unwrap_or_else(|_| TelemetryGuard::inactive())
    });
}

/// How printed log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    /// Parses the value of `DEVFLEET_LOG_FORMAT`; unset or empty means text.
    fn parse(value: Option<&str>) -> Result<Self, TelemetryError> {
        match value.map(str::trim) {
            None | Some("") => Ok(Self::Text),
            Some(v) if v.eq_ignore_ascii_case("text") => Ok(Self::Text),
            Some(v) if v.eq_ignore_ascii_case("json") => Ok(Self::Json),
            Some(v) => Err(TelemetryError::InvalidLogFormat {
                variable: LOG_FORMAT_VAR,
                value: v.to_owned(),
            }),
        }
    }
}

/// Everything [`init`] reads from the environment, parsed and validated.
struct Settings {
    filter: EnvFilter,
    format: LogFormat,
    /// Whether spans are exported over OTLP.
    export: bool,
}

impl Settings {
    fn from_env() -> Result<Self, TelemetryError> {
        Ok(Self {
            filter: log_filter(env_var(LOG_FILTER_VAR).as_deref())?,
            format: LogFormat::parse(env_var(LOG_FORMAT_VAR).as_deref())?,
            export: env_var(OTLP_ENDPOINT_VAR).is_some()
                || env_var(OTLP_TRACES_ENDPOINT_VAR).is_some(),
        })
    }
}

/// A non-empty environment variable.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The log filter for `RUST_LOG`'s value; unset or empty means `info`.
fn log_filter(value: Option<&str>) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .parse(value.unwrap_or(""))
        .map_err(|source| TelemetryError::InvalidLogFilter {
            variable: LOG_FILTER_VAR,
            source,
        })
}

/// Builds the tracer provider, with an OTLP batch exporter when `export`.
///
/// Without an exporter the provider still samples and assigns ids, which is
/// what lets a service with no collector pass trace context on unchanged.
fn tracer_provider(service: &str, export: bool) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if export {
        // Only HTTP/protobuf is compiled in; saying so here makes a stray
        // `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` harmless instead of an error.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()
            .map_err(|source| TelemetryError::Exporter {
                variable: if env_var(OTLP_TRACES_ENDPOINT_VAR).is_some() {
                    OTLP_TRACES_ENDPOINT_VAR
                } else {
                    OTLP_ENDPOINT_VAR
                },
                source,
            })?;
        // The batch processor runs on its own thread, which is what the
        // blocking HTTP client needs (no async runtime required).
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// The subscriber: an OpenTelemetry layer for `INFO`+ spans and a log layer
/// filtered by `filter`, writing to `writer`.
fn build_subscriber<W>(
    filter: EnvFilter,
    format: LogFormat,
    tracer: SdkTracer,
    writer: W,
    ansi: bool,
) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(TRACE_LEVEL);
    tracing_subscriber::registry()
        .with(otel)
        .with(log_layer(format, writer, ansi).with_filter(filter))
}

/// The log-printing layer in the chosen format.
fn log_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => fmt::layer().with_writer(writer).with_ansi(ansi).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
    }
}

/// Installs the subscriber globally unless one already is.
fn install<W>(
    service: &str,
    settings: Settings,
    writer: W,
    ansi: bool,
) -> Result<TelemetryGuard, TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    if tracing::dispatcher::has_been_set() {
        return Ok(TelemetryGuard::inactive());
    }
    let provider = tracer_provider(service, settings.export)?;
    let subscriber = build_subscriber(
        settings.filter,
        settings.format,
        provider.tracer(TRACER_NAME),
        writer,
        ansi,
    );
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        // Another thread installed one between the check and here.
        let _ = provider.shutdown();
        return Ok(TelemetryGuard::inactive());
    }
    // Dependencies that log through the `log` crate (HTTP and Redis clients)
    // get the same filter and format. Failing only means someone else set a
    // `log` logger first, which is theirs to keep.
    let _ = tracing_log::LogTracer::init();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer that keeps everything written to it.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn error_converts_into_anyhow_and_guard_can_be_shared() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}
        fn assert_send_sync<T: Send + Sync>() {}
        assert_error::<TelemetryError>();
        assert_send_sync::<TelemetryGuard>();
    }

    #[test]
    fn log_format_accepts_text_and_json_in_any_case() {
        assert_eq!(LogFormat::parse(None).unwrap(), LogFormat::Text);
        assert_eq!(LogFormat::parse(Some("")).unwrap(), LogFormat::Text);
        assert_eq!(LogFormat::parse(Some("text")).unwrap(), LogFormat::Text);
        assert_eq!(LogFormat::parse(Some("json")).unwrap(), LogFormat::Json);
        assert_eq!(LogFormat::parse(Some(" JSON ")).unwrap(), LogFormat::Json);
    }

    #[test]
    fn unknown_log_format_is_an_error_naming_the_variable() {
        let error = LogFormat::parse(Some("xml")).unwrap_err();
        assert!(matches!(
            &error,
            TelemetryError::InvalidLogFormat { variable, value }
                if *variable == LOG_FORMAT_VAR && value == "xml"
        ));
        assert!(error.to_string().contains(LOG_FORMAT_VAR));
    }

    #[test]
    fn log_filter_defaults_to_info_and_rejects_garbage() {
        assert_eq!(log_filter(None).unwrap().to_string(), "info");
        assert_eq!(
            log_filter(Some("devfleet=debug")).unwrap().to_string(),
            "devfleet=debug"
        );
        let error = log_filter(Some("devfleet=loud")).unwrap_err();
        assert!(error.to_string().contains(LOG_FILTER_VAR));
    }

    #[test]
    fn json_format_writes_one_json_object_per_line_and_keeps_trace_context() {
        let provider = tracer_provider("json-test", false).unwrap();
        let capture = Capture::default();
        let subscriber = build_subscriber(
            log_filter(None).unwrap(),
            LogFormat::Json,
            provider.tracer(TRACER_NAME),
            capture.clone(),
            false,
        );
        let traceparent = tracing::subscriber::with_default(subscriber, || {
            tracing::info_span!("work", task_id = "t-1").in_scope(|| {
                tracing::info!(attempt = 2, "hello");
                tracing::debug!("filtered out at the default level");
                crate::current_traceparent()
            })
        });

        assert!(
            traceparent.is_some(),
            "JSON logging must not disable tracing"
        );
        let output = capture.text();
        let lines: Vec<serde_json::Value> = output
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "output: {output}");
        assert_eq!(lines[0]["fields"]["message"], "hello");
        assert_eq!(lines[0]["fields"]["attempt"], 2);
        assert_eq!(lines[0]["span"]["task_id"], "t-1");
    }

    #[test]
    fn text_format_writes_plain_lines() {
        let provider = tracer_provider("text-test", false).unwrap();
        let capture = Capture::default();
        let subscriber = build_subscriber(
            log_filter(None).unwrap(),
            LogFormat::Text,
            provider.tracer(TRACER_NAME),
            capture.clone(),
            false,
        );
        tracing::subscriber::with_default(subscriber, || tracing::info!("plain"));
        let output = capture.text();
        assert!(
            output.contains("INFO") && output.contains("plain"),
            "{output}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(output.trim()).is_err());
    }

    #[test]
    fn quiet_log_filter_does_not_cut_traces() {
        let provider = tracer_provider("quiet-test", false).unwrap();
        let subscriber = build_subscriber(
            log_filter(Some("error")).unwrap(),
            LogFormat::Text,
            provider.tracer(TRACER_NAME),
            Capture::default(),
            false,
        );
        let traceparent = tracing::subscriber::with_default(subscriber, || {
            tracing::info_span!("handler").in_scope(crate::current_traceparent)
        });
        assert!(traceparent.is_some());
    }

    #[test]
    fn repeated_initialisation_returns_an_inactive_guard() {
        init_for_tests();
        init_for_tests();
        let settings = Settings {
            filter: log_filter(None).unwrap(),
            format: LogFormat::Json,
            export: false,
        };
        let guard = install("second", settings, Capture::default(), false).unwrap();
        assert!(!guard.is_active());
        drop(guard);
        // The first installation is untouched by dropping the second guard.
        let traceparent = tracing::info_span!("still-traced").in_scope(crate::current_traceparent);
        assert!(traceparent.is_some());
    }
}
