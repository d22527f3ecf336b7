//! `Idempotency-Key` on the billed endpoints (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/responses`): a repeat of a request by the same customer with the same key and the same
//! body, within [`WINDOW`], gets the first request's response (a stream gets the same events)
//! and creates no second usage record and no second charge.
//!
//! The contract (README, "Idempotent retries"):
//! - the key is any printable ASCII string of 1 to 255 characters, scoped to the customer;
//! - the same key with another body (compared as JSON: key order and spacing aside) or
//!   route is a 409 `idempotency_key_reused`;
//! - a repeat while the first is still running is a 409 `idempotency_key_in_progress` with
//!   `Retry-After: 1` (OpenAI's SDKs retry it and then get the stored result);
//! - a request that does not complete (refused, failed, or cut by a gateway that stopped) keeps
//!   nothing: a repeat runs anew;
//! - a request with a key runs to completion even when its client goes away, so that the
//!   client's retry gets the whole answer instead of paying for a second one;
//! - a key is charged once: a request that lost its lease to a retry stops, is recorded
//!   `superseded` (not charged), and its client gets a 409 `idempotency_key_in_progress` (or
//!   that error as the stream's last event), whose retry gets the other request's answer (see
//!   [`lease`]).
//!
//! It owns the layer (the table is `tollgate_metering::requests::idempotency`); what a request costs is
//! still settled by the [`crate::api::accounting::Completion`] guard, which reports its outcome through
//! the [`Ticket`].

mod lease;
pub mod ticket;

pub use ticket::Ticket;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{AppState, RequestId};
use tollgate_metering::requests::idempotency::{Claim, ClaimArgs, Stored};
use tollgate_metering::store::now_micros;

/// How long a key is remembered after its first request.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The header, as OpenAI's and Stripe's clients send it.
pub const HEADER: &str = "idempotency-key";
/// Longest key accepted.
const MAX_KEY_LEN: usize = 255;

/// The key of a request, checked: `None` without the header.
pub fn key_of(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let invalid = |why: &str| ApiError::InvalidRequest {
        message: format!("invalid Idempotency-Key header: {why}"),
        param: Some("Idempotency-Key".into()),
    };
    let text = value
        .to_str()
        .map_err(|_| invalid("it must be printable ASCII"))?;
    if text.is_empty() {
        return Err(invalid("it is empty"));
    }
    if text.len() > MAX_KEY_LEN {
        return Err(invalid(&format!(
            "it has {} characters, more than {MAX_KEY_LEN}",
            text.len()
        )));
    }
    if !text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(invalid("it must be printable ASCII"));
    }
    Ok(Some(text.to_string()))
}

/// What makes two requests "the same": the method, the route and the body, as JSON values
/// (key order and white space aside; a body that is not JSON: its exact bytes).
pub fn request_hash(method: &str, path: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => {
            let mut text = String::with_capacity(body.len());
            canonical(&value, &mut text);
            h.update(text.as_bytes());
        }
        Err(_) => h.update(body),
    }
    tollgate_metering::secrets::hex(&h.finalize())
}

/// Compact JSON with object keys sorted.
fn canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 4)
}

/// The layer on the billed routes (inside authentication: it needs the customer).
pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match run(state, request, next).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn run(state: AppState, request: Request, next: Next) -> Result<Response, ApiError> {
    let Some(key) = key_of(request.headers())? else {
        return Ok(next.run(request).await);
    };
    let Some(db) = state.store.clone() else {
        return Err(ApiError::InvalidRequest {
            message: "Idempotency-Key needs a database to keep results in; this server runs \
                      without one"
                .into(),
            param: Some("Idempotency-Key".into()),
        });
    };
    let (mut parts, body) = request.into_parts();
    let limit = state.config.server.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit })?;
    let mut caller = parts
        .extensions
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("idempotency layer without a caller".into()))?;
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let hash = request_hash(parts.method.as_str(), parts.uri.path(), &bytes);
    let now = now_micros();
    let claim = db
        .claim_idempotency(&ClaimArgs {
            customer_id: &caller.customer_id,
            key: &key,
            request_hash: &hash,
            request_id: &request_id,
            now,
            expires_at: now + micros(WINDOW),
            lease_until: now + micros(state.config.server.idempotency_lease),
        })
        .await?;
    if let Some(answer) = answer_without_running(claim, &key)? {
        return Ok(answer);
    }
    let mut ticket = Ticket::new(key.clone());
    ticket.lease = Some(Arc::new(lease::Lease::new(
        db.clone(),
        caller.customer_id.clone(),
        key.clone(),
        request_id.clone(),
        state.config.server.idempotency_lease,
        now,
    )));
    caller.idempotency = Some(ticket.clone());
    parts.extensions.insert(caller.clone());
    let request = Request::from_parts(parts, Body::from(bytes));
    let running = Running {
        db,
        customer_id: caller.customer_id,
        key,
        request_id,
        ticket,
    };
    // Detached from the client's connection: the request runs to completion and its result
    // is kept even when the client goes away.
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    state.tasks.spawn(running.drive(next.run(request), head_tx));
    head_rx
        .await
        .map_err(|_| ApiError::Internal("the idempotent request's task ended early".into()))
}

/// What a claim that does not let the request run answers: the kept response, or why not.
fn answer_without_running(claim: Claim, key: &str) -> Result<Option<Response>, ApiError> {
    match claim {
        Claim::Run => Ok(None),
        Claim::Replay(stored) => Ok(Some(replay(stored))),
        Claim::Mismatch => Err(ApiError::IdempotencyKeyReused(format!(
            "the Idempotency-Key `{key}` was already used with a different request; use a new \
             key for a new request"
        ))),
        Claim::InProgress => Err(ApiError::IdempotencyKeyInProgress(format!(
            "a request with the Idempotency-Key `{key}` is still running; retry shortly to get \
             its result"
        ))),
    }
}

/// A request running under a claimed key.
struct Running {
    db: tollgate_metering::store::Store,
    customer_id: String,
    key: String,
    request_id: String,
    ticket: Ticket,
}

impl Running {
    /// Runs the request, hands its response to the client as it is produced, and keeps it
    /// (or releases the key) at the end. A request that loses its lease stops there (its
    /// response future or body is dropped, as when a client goes away without a key) and its
    /// client gets an error in place of the end of the answer.
    async fn drive(
        self,
        response: impl std::future::Future<Output = Response>,
        head_tx: tokio::sync::oneshot::Sender<Response>,
    ) {
        let Some(lease) = self.ticket.lease.clone() else {
            return;
        };
        let renew = renewing(lease.clone());
        let response = tokio::select! {
            r = response => Some(r),
            () = lease.lost() => None,
        };
        // Lost before the head (a JSON answer is whole by then: its record says so).
        let Some(response) = response.filter(|_| !self.ticket.lost()) else {
            drop(renew);
            let _ = head_tx.send(self.superseded().into_response());
            self.release().await;
            return;
        };
        let (parts, body) = response.into_parts();
        let status = parts.status;
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (frames_tx, frames_rx) = tokio::sync::mpsc::channel(64);
        let to_client = Response::from_parts(
            parts,
            Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(frames_rx)),
        );
        let mut client = head_tx.send(to_client).ok().map(|()| frames_tx);
        let relayed = relay(body, &lease, &mut client).await;
        drop(renew);
        let kept_it = if !self.ticket.lost()
            && status.is_success()
            && !relayed.broken
            && self.ticket.completed()
        {
            let stored = Stored {
                status: status.as_u16(),
                content_type: content_type.clone(),
                body: String::from_utf8_lossy(&relayed.kept).into_owned(),
                request_id: self.request_id.clone(),
            };
            self.keep(&stored).await
        } else {
            self.release().await;
            false
        };
        let lost = self.ticket.lost() || (!kept_it && self.ticket.completed());
        if lost {
            let is_sse = content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("text/event-stream"));
            send(&mut client, self.superseded_frame(is_sse)).await;
        } else if let Some(last) = relayed.held {
            send(&mut client, last).await;
        }
    }

    /// Keeps the completed response for repeats; whether the client may have its last frame
    /// (false when another request took the key over meanwhile).
    async fn keep(&self, stored: &Stored) -> bool {
        match self
            .db
            .finish_idempotency(&self.customer_id, &self.key, &self.request_id, stored)
            .await
        {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(request_id = %self.request_id, "an idempotent request finished after another took its key over");
                false
            }
            // The key stays `running` until its lease runs out; a repeat then runs anew.
            Err(e) => {
                tracing::error!(request_id = %self.request_id, error = %e, "cannot keep an idempotent result");
                true
            }
        }
    }

    /// Forgets the key when this request still holds it, so a repeat runs anew.
    async fn release(&self) {
        if let Err(e) = self
            .db
            .release_idempotency(&self.customer_id, &self.key, &self.request_id)
            .await
        {
            tracing::error!(request_id = %self.request_id, error = %e, "cannot release an idempotency key");
        }
    }

    /// What the client of a request that lost its key gets.
    fn superseded(&self) -> ApiError {
        ApiError::IdempotencyKeyInProgress(format!(
            "this request lost the Idempotency-Key `{}` to another request with it (its lease \
             ran out): it was stopped and is not charged; retry to get the other request's result",
            self.key
        ))
    }

    /// The end of a response whose request lost its key, in place of its last frame: an error
    /// event and `[DONE]` for a stream, the error's body otherwise.
    fn superseded_frame(&self, is_sse: bool) -> Bytes {
        let error = self.superseded();
        let body = serde_json::json!({"error": {
            "message": error.to_string(),
            "type": "invalid_request_error",
            "param": null,
            "code": "idempotency_key_in_progress",
        }});
        if is_sse {
            Bytes::from(format!("data: {body}\n\ndata: [DONE]\n\n"))
        } else {
            Bytes::from(body.to_string())
        }
    }
}

/// Renews `lease` until it is lost or the returned guard is dropped.
fn renewing(lease: Arc<lease::Lease>) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        loop {
            tokio::time::sleep(lease.renew_every()).await;
            if !lease.renew().await {
                break;
            }
        }
    }))
}

/// What [`relay`] passed on: the whole body as kept, the last frame held back, and whether
/// the body failed.
struct Relayed {
    kept: Vec<u8>,
    held: Option<Bytes>,
    broken: bool,
}

/// Passes the body's frames to the client while keeping them, until its end, an error or the
/// lease's loss. The last frame is held back until the result is kept, so a client that
/// repeats the request as soon as it has the answer finds it stored, not still running.
/// Dropping the body at the end stops generating when the lease was lost (the guard then
/// records the tokens so far).
async fn relay(body: Body, lease: &lease::Lease, client: &mut Option<FrameSender>) -> Relayed {
    let mut relayed = Relayed {
        kept: Vec::new(),
        held: None,
        broken: false,
    };
    let mut body = body.into_data_stream();
    loop {
        let frame = tokio::select! {
            frame = body.next() => frame,
            () = lease.lost() => break,
        };
        let Some(frame) = frame else { break };
        match frame {
            Ok(bytes) => {
                relayed.kept.extend_from_slice(&bytes);
                if let Some(previous) = relayed.held.replace(bytes) {
                    send(client, previous).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "an idempotent response's body failed");
                relayed.broken = true;
                break;
            }
        }
    }
    relayed
}

/// Hands a frame to the client, forgetting a client that went away (the request still runs
/// to its end).
async fn send(client: &mut Option<FrameSender>, bytes: Bytes) {
    if let Some(tx) = client {
        if tx.send(Ok(bytes)).await.is_err() {
            *client = None;
        }
    }
}

type FrameSender = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The stored response, as first sent, marked as a replay.
fn replay(stored: Stored) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut response = (status, stored.body).into_response();
    let headers = response.headers_mut();
    if let Some(ct) = stored
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    if let Ok(v) = HeaderValue::from_str(&stored.request_id) {
        headers.insert("original-request-id", v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;
    use tollgate_metering::kinds::Outcome;

    fn headers(value: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_bytes(value).unwrap());
        h
    }

    #[test]
    fn keys_are_printable_ascii_up_to_255() {
        assert_eq!(key_of(&HeaderMap::new()).unwrap(), None);
        assert_eq!(
            key_of(&headers(b"retry-1 of job/42")).unwrap().as_deref(),
            Some("retry-1 of job/42")
        );
        assert!(key_of(&headers("k".repeat(255).as_bytes())).is_ok());
        for bad in [
            &b""[..],
            "k".repeat(256).as_bytes(),
            b"caf\xc3\xa9",
            b"a\tb",
        ] {
            let e = key_of(&headers(bad)).unwrap_err();
            assert!(
                matches!(&e, ApiError::InvalidRequest { param: Some(p), .. } if p == "Idempotency-Key"),
                "{e:?}"
            );
        }
    }

    #[test]
    fn the_same_request_is_the_same_method_route_and_json_body() {
        let a = request_hash(
            "POST",
            "/v1/chat/completions",
            br#"{"a":1,"b":[{"y":2,"x":1}]}"#,
        );
        let same = br#"{ "b": [ {"x": 1, "y": 2} ], "a": 1 }"#;
        assert_eq!(a, request_hash("POST", "/v1/chat/completions", same));
        assert_ne!(
            a,
            request_hash(
                "POST",
                "/v1/chat/completions",
                br#"{"a":2,"b":[{"y":2,"x":1}]}"#
            )
        );
        assert_ne!(
            a,
            request_hash(
                "POST",
                "/v1/chat/completions",
                br#"{"a":1,"b":[{"x":1},{"y":2}]}"#
            )
        );
        assert_ne!(a, request_hash("POST", "/v1/completions", same));
        // Not JSON: the bytes themselves.
        assert_ne!(
            request_hash("POST", "/p", b"{x"),
            request_hash("POST", "/p", b"{ x")
        );
    }

    #[test]
    fn only_a_completed_request_is_kept() {
        let t = Ticket::new("k".into());
        assert!(!t.completed());
        t.settled(Outcome::Completed);
        t.settled(Outcome::Failed);
        assert!(t.completed(), "the first outcome stands");
        let t = Ticket::new("k".into());
        t.settled(Outcome::Cancelled);
        assert!(!t.completed());
    }
}
