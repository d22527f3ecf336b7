//! Request bodies read whole before any handler or middleware answers. A server that answers
//! before it has read the body (a 401, 403 or 429 from the middleware, a 413 from the limit)
//! either closes the connection under the client, who then sees "server disconnected" on its
//! next request over that keep-alive connection, or, when the client is still writing, makes
//! the kernel reset it and the answer is lost with it (an SDK then reports "connection error",
//! not the OpenAI-shaped error). Reading the body first (within `max_body_bytes`, which every
//! handler buffers anyway) keeps the connection clean whatever the answer.
//!
//! A body past the limit is read and dropped (up to `DRAIN_CAP` bytes and `DRAIN_TIME`), then
//! refused with 413; past either cap the connection is cut as before.
//!
//! File uploads (`POST /v1/files`, up to 200 MB) are the exception: their handler streams the
//! body to storage and enforces its own limits.

use std::time::Duration;

use axum::body::Body;
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

/// Reads what is left of a refused body and drops it (within the caps).
async fn drain(body: Body) {
    let mut stream = body.into_data_stream();
    let mut read = 0u64;
    let drain = async {
        while let Some(Ok(chunk)) = stream.next().await {
            read = read.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
            if read > DRAIN_CAP {
                break;
            }
        }
    };
    // A client slower than DRAIN_TIME is cut off, as it would have been without this.
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

/// Reads the request's body whole (at most `limit` bytes) before the rest of the stack sees the
/// request; refuses a larger one with 413 once it has been read.
pub(crate) async fn read_body_first(limit: usize, request: Request, next: Next) -> Response {
    let limit_bytes = u64::try_from(limit).unwrap_or(u64::MAX);
    if request.method() == axum::http::Method::POST && request.uri().path() == "/v1/files" {
        return next.run(request).await;
    }
    let declared = declared_length(&request);
    let (parts, body) = request.into_parts();
    if let Some(length) = declared.filter(|n| *n > limit_bytes) {
        if length <= DRAIN_CAP {
            drain(body).await;
        }
        return ApiError::PayloadTooLarge { limit }.into_response();
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        // Past the limit without a declared length (chunked), or the client went away while
        // sending: either way the body is not usable.
        Err(_) => ApiError::PayloadTooLarge { limit }.into_response(),
    }
}
