//! The `/v1` routes' middleware: resolves the caller from its key ([`super::AuthConfig`]),
//! then adds the rate-limit headers to the answer. Apart from the key cache so that the state,
//! which holds the cache, does not depend on what reads the state.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tollgate_metering::limits::BucketStatus;

use super::{bearer, forwarded_customer, reset_text};
use crate::error::ApiError;
use crate::AppState;

fn put_rate_headers(headers: &mut HeaderMap, kind: &str, status: &BucketStatus) {
    let mut put = |name: String, value: String| {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.insert(n, v);
        }
    };
    put(
        format!("x-ratelimit-limit-{kind}"),
        status.limit.to_string(),
    );
    put(
        format!("x-ratelimit-remaining-{kind}"),
        status.remaining.to_string(),
    );
    put(
        format!("x-ratelimit-reset-{kind}"),
        reset_text(status.reset),
    );
}

/// Middleware for the `/v1` routes: resolves the caller, then adds the rate-limit headers.
pub async fn require_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(key) = bearer(request.headers()) else {
        return ApiError::InvalidApiKey(
            "you didn't provide an API key: send `Authorization: Bearer <key>`".into(),
        )
        .into_response();
    };
    let t = std::time::Instant::now();
    let span = crate::server::telemetry::span(|| tracing::info_span!("gateway.auth"));
    let caller =
        tracing::Instrument::instrument(state.auth.resolve(state.store.as_ref(), key), span).await;
    state
        .metrics
        .metering_duration
        .with_label_values(&["auth"])
        .observe(t.elapsed().as_secs_f64());
    let mut caller = match caller {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if state.auth.trusts_forwarded_customer {
        if let Err(e) = forwarded_customer(&mut caller, request.headers()) {
            return e.into_response();
        }
    }
    request.extensions_mut().insert(caller.clone());
    let mut response = next.run(request).await;
    let status = state.limiter.status(&caller.limits);
    if let Some(s) = status.requests {
        put_rate_headers(response.headers_mut(), "requests", &s);
    }
    if let Some(s) = status.tokens {
        put_rate_headers(response.headers_mut(), "tokens", &s);
    }
    response
}
