//! Logs and traces: one `tracing` subscriber writing text or JSON lines to stderr and, when an
//! OTLP endpoint is configured, exporting the RPC and ECR-call spans to an OpenTelemetry
//! collector. Also the W3C trace context (`traceparent`) a caller sends.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The service name on exported spans unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "ecr-image-service";

/// Whether spans are exported; read per request to skip parent linking when they are not.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The OTLP exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces to {endpoint}: {source}")]
pub struct TelemetryError {
    endpoint: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// The installed telemetry; [`Telemetry::shutdown`] sends the spans still buffered.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the span exporter, if there is one.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!(error = %err, "could not flush the last spans");
        }
    }
}

/// Installs the global subscriber. `filter` has been validated with the configuration. With
/// `otlp_endpoint`, must run inside the Tokio runtime (the exporter's gRPC channel lives there).
pub fn init(
    format: LogFormat,
    filter: &str,
    otlp_endpoint: Option<&str>,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(endpoint) = otlp_endpoint else {
        // No export: one global filter, so disabled spans and events cost a cached check.
        tracing_subscriber::registry()
            .with(filter)
            .with(log_lines(format))
            .init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(SERVICE_NAME).build())
        .build();
    // Our own spans only (the RPC and the ECR call): the SDK's internal spans would multiply
    // the export volume, and events stay in the logs.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SERVICE_NAME))
        .with_filter(filter_fn(|meta| {
            meta.is_span() && meta.target().starts_with(env!("CARGO_CRATE_NAME"))
        }));
    tracing_subscriber::registry()
        .with(log_lines(format).with_filter(filter))
        .with(spans)
        .init();
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The log-line layer: text for people, flattened JSON for log pipelines.
fn log_lines<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Logs go to stderr, so a failed write cannot be reported there either; reporting it
        // with `eprintln!` would panic when a log collector has closed the pipe, and turn a
        // dead log shipper into a dead service.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => layer.boxed(),
        // Flattened events with the request span's fields, so each line stands alone.
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
}

/// A caller's W3C trace context: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace this request belongs to, as 32 lowercase hex digits.
    pub trace_id: String,
    parent_id: String,
    flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` header; `None` if malformed (an all-zero ID is invalid by the
    /// spec, and so is a version-00 header with extra parts).
    pub fn parse(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
        let valid = hex(version, 2)
            && version != "ff"
            && hex(trace_id, 32)
            && nonzero(trace_id)
            && hex(parent_id, 16)
            && nonzero(parent_id)
            && hex(flags, 2)
            && (version != "00" || parts.next().is_none());
        valid.then(|| Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).unwrap_or_default(),
        })
    }

    /// Makes `span` a child of the caller's span, so exported spans join the caller's trace.
    /// A no-op unless spans are exported.
    pub fn adopt(&self, span: &tracing::Span) {
        if !EXPORTING.load(Ordering::Relaxed) {
            return;
        }
        let (Ok(trace_id), Ok(span_id)) = (
            TraceId::from_hex(&self.trace_id),
            SpanId::from_hex(&self.parent_id),
        ) else {
            return;
        };
        let remote = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(self.flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

#[cfg(test)]
mod tests {
    use super::TraceParent;

    #[test]
    fn traceparents_yield_their_trace_id() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let parsed = TraceParent::parse(&format!("00-{trace}-00f067aa0ba902b7-01")).unwrap();
        assert_eq!(parsed.trace_id, trace);
        assert_eq!(parsed.flags, 1);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
