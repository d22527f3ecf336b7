//! Bodies declared past the body limit (`Content-Length` above `max_body_bytes`): answered
//! 413 once the client has sent them, the bytes read and dropped, so the client reads the
//! OpenAI-shaped error instead of a connection reset. A server that answers and closes while
//! the client still writes makes the kernel reset the connection, and the answer is lost with
//! it (what an SDK then reports is "connection error", not "too large"). What this reads is
//! bounded in bytes and in time; past either the connection is closed as before.

use std::time::Duration;

use axum::extract::Request;
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::error::ApiError;

/// The most a refused body is read for: beyond it the client is cut off.
const DRAIN_CAP: u64 = 64 << 20;
/// How long a refused body may take to arrive.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The declared length, when the request declares one.
fn declared_length(request: &Request) -> Option<u64> {
    request
        .headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Refuses a body declared past `limit` with 413, after reading it (within the caps).
pub(crate) async fn refuse_declared_oversize(
    limit: usize,
    request: Request,
    next: Next,
) -> Response {
    let limit_bytes = u64::try_from(limit).unwrap_or(u64::MAX);
    let Some(length) = declared_length(&request).filter(|n| *n > limit_bytes) else {
        return next.run(request).await;
    };
    if length <= DRAIN_CAP {
        let mut body = request.into_body().into_data_stream();
        let drain = async { while let Some(Ok(_)) = body.next().await {} };
        // A client slower than DRAIN_TIME is cut off, as it would have been without this.
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    }
    ApiError::PayloadTooLarge { limit }.into_response()
}
