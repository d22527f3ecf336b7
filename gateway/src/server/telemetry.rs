//! OpenTelemetry traces, on only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: each request becomes a server span with the
//! GenAI semantic conventions' attributes, with child spans for auth, limits, and the backend's
//! phases (queue, prefill, decode in the local engine; the upstream call, which carries a W3C
//! `traceparent`). A client's `traceparent` makes the request part of the client's trace.
//!
//! Exported over OTLP/HTTP (protobuf) by a batch processor on its own thread; the standard
//! `OTEL_*` variables configure it (endpoint, headers, timeout, `OTEL_SERVICE_NAME`,
//! `OTEL_BSP_*`). When off, no span of this module is created ([`span`] returns
//! `Span::none()`), no header is read or written, and nothing is exported.
//!
//! Owns the exporter's set-up and the span helpers; it does not decide what is recorded on the
//! spans (the request path does).

use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported (set once at start).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// `make()` when traces are exported, else `Span::none()`, so a request pays nothing for
/// spans nobody reads.
pub fn span(make: impl FnOnce() -> Span) -> Span {
    if enabled() {
        make()
    } else {
        Span::none()
    }
}

/// Flushes the spans still buffered when dropped (or at [`Telemetry::shutdown`]). Drop it
/// outside any async runtime: the exporter's HTTP client is a blocking one.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("OpenTelemetry: flushing the last spans failed: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether the environment asks for traces.
pub fn requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
        && !std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true")
}

/// The tracing layer that exports Tollgate's spans, and its flush guard; `None` unless the
/// environment asks for traces. Call before starting an async runtime.
pub fn from_env<S>() -> anyhow::Result<Option<(impl Layer<S>, Telemetry)>>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    if !requested() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "tollgate".to_string());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer("tollgate");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    ENABLED.store(true, Ordering::Relaxed);
    // Only Tollgate's own spans (the request, its phases), not every library's.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target().starts_with("tollgate")
        }));
    Ok(Some((layer, Telemetry { provider })))
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` a child of the caller's span when the request carries a W3C `traceparent`.
pub fn accept_parent(span: &Span, headers: &HeaderMap) {
    if !enabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if let Err(e) = span.set_parent(parent) {
        tracing::debug!("traceparent not applied: {e}");
    }
}

/// Renames an exported span once more is known (`chat smollm2-135m` once the model is).
pub fn rename(span: &Span, name: String) {
    if enabled() {
        span.context().span().update_name(name);
    }
}

/// The W3C `traceparent` (and `tracestate`) of `span`, for a request to an upstream; empty
/// when traces are off.
pub fn propagation_headers(span: &Span) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if enabled() {
        TraceContextPropagator::new()
            .inject_context(&span.context(), &mut HeadersMut(&mut headers));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_means_no_spans_and_no_headers() {
        assert!(!enabled());
        let s = span(|| tracing::info_span!("x"));
        assert!(s.is_none());
        assert!(propagation_headers(&s).is_empty());
    }
}
