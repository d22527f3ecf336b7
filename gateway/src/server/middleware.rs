//! The middleware around every route: a request id for each request (`x-request-id`), and
//! request counts, durations and the server span by route template, model and status (no span
//! or log line for `/health` and `/metrics`). Also the request extensions they and the
//! handlers share.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

use crate::server::telemetry;
use crate::AppState;

/// Per-request id (UUID v7), set by the request-id middleware and sent as `x-request-id`,
/// with the moment the request reached the gateway (for the overhead histogram).
#[derive(Debug, Clone)]
pub struct RequestId(pub String, pub Instant);

/// The model a response was for, set by handlers for the metrics middleware.
#[derive(Debug, Clone)]
pub struct ModelLabel(pub String);

/// Gives every request a UUID v7 and every response its `x-request-id`.
pub(super) async fn request_id(mut request: Request, next: Next) -> Response {
    let id = uuid::Uuid::now_v7().to_string();
    request
        .extensions_mut()
        .insert(RequestId(id.clone(), Instant::now()));
    let mut response = next.run(request).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Request counts and durations by route template, model and status, plus a log line.
pub(super) async fn observe(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().clone();
    let started = Instant::now();
    // Probes and scrapes arrive every few seconds: counted, but neither traced nor logged.
    let quiet = is_probe(&route);
    let span = telemetry::span(|| {
        if quiet {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            "request",
            otel.name = %format!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
            gen_ai.operation.name = tracing::field::Empty,
            gen_ai.provider.name = "tollgate",
            gen_ai.request.model = tracing::field::Empty,
            gen_ai.request.max_tokens = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            tollgate.request_id = tracing::field::Empty,
            tollgate.customer_id = tracing::field::Empty,
        );
        telemetry::accept_parent(&span, request.headers());
        if let Some(id) = request.extensions().get::<RequestId>() {
            span.record("tollgate.request_id", id.0.as_str());
        }
        span
    });
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let model = response
        .extensions()
        .get::<ModelLabel>()
        .map(|m| m.0.as_str())
        .filter(|m| state.catalogue.current().models.contains_key(*m))
        .unwrap_or("none")
        .to_string();
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), model.as_str(), status.as_str()])
        .inc();
    state
        .metrics
        .request_duration
        .with_label_values(&[route.as_str(), model.as_str()])
        .observe(started.elapsed().as_secs_f64());
    if !quiet {
        tracing::debug!(%method, %route, status = status.as_u16(), ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "request");
    }
    response
}

/// Routes that health checks and metric scrapers call.
pub(crate) fn is_probe(route: &str) -> bool {
    matches!(route, "/health" | "/metrics")
}
