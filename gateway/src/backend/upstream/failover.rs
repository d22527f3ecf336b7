//! Failover, shared by chat streams and Responses passthrough: the members are tried best
//! first; one that refuses with a 5xx or 429, cannot be reached, or breaks off before its first
//! output is skipped (and, but for a 503 or 429, marked down) and the next one tried. Once
//! output has streamed, a failure ends the stream with [`BackendError::Broken`]. A worker that
//! cannot load the request's LoRA adapter (`adapter_unavailable`) ends it at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use serde_json::Value;

use super::Member;
use crate::backend::BackendError;

/// Releases a member's in-flight slot when the stream ends or is dropped.
struct InFlight(Arc<Member>);

impl InFlight {
    fn new(m: Arc<Member>) -> Self {
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(m)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one upstream attempt ended with before its first event.
enum Attempt {
    Stream(reqwest::Response),
    /// Try another member.
    Retry(Failed),
    /// Final: the request itself was refused (4xx other than 429).
    Refused(BackendError),
}

/// What every attempt presents: the operator's key for the upstream, and the headers
/// forwarded to it (a `tollgate worker`'s customer and weight, the request's adapter).
pub(super) struct Credentials {
    pub api_key: Option<String>,
    pub forwarded: Vec<(&'static str, String)>,
    /// The key of the request's LoRA adapter: the member that accepts the request holds it.
    pub adapter: Option<String>,
}

/// Why an attempt is retried on another member.
struct Failed {
    /// The member answered 429 or 503: busy, not broken (when every member is, the client
    /// is told to come back rather than that the service is down).
    busy: bool,
    /// The member answered 429 `resource_unavailable` (a flex request it found no capacity
    /// for) with this `Retry-After` (seconds; 1 when it gave none).
    no_capacity: Option<u64>,
    /// For the logs and the final error: the member and what it said.
    message: String,
}

async fn attempt(
    client: &reqwest::Client,
    member: &Member,
    credentials: &Credentials,
    path: &str,
    body: &Value,
    call: &tracing::Span,
) -> Attempt {
    let mut req = member
        .post(client, path)
        .json(body)
        .headers(crate::server::telemetry::propagation_headers(call));
    if let Some(k) = &credentials.api_key {
        req = req.bearer_auth(k);
    }
    for (name, value) in &credentials.forwarded {
        req = req.header(*name, value);
    }
    let response = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            member.healthy.store(false, Ordering::Relaxed);
            return Attempt::Retry(Failed {
                busy: false,
                no_capacity: None,
                message: format!("{}: {e}", member.base),
            });
        }
    };
    let status = response.status();
    call.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_success() {
        return Attempt::Stream(response);
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let text = response.text().await.unwrap_or_default();
    let error = serde_json::from_str::<Value>(&text).ok();
    let param = error
        .as_ref()
        .and_then(|v| v["error"]["param"].as_str().map(str::to_string));
    let message = error
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(text);
    if let Some(refused) = adapter_refusal(member, error.as_ref(), &message) {
        return refused;
    }
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        let busy = matches!(
            status,
            reqwest::StatusCode::TOO_MANY_REQUESTS | reqwest::StatusCode::SERVICE_UNAVAILABLE
        );
        if !busy {
            member.healthy.store(false, Ordering::Relaxed);
        }
        let no_capacity = (status == reqwest::StatusCode::TOO_MANY_REQUESTS
            && error
                .as_ref()
                .is_some_and(|v| v["error"]["code"] == "resource_unavailable"))
        .then(|| retry_after.unwrap_or(1));
        return Attempt::Retry(Failed {
            busy,
            no_capacity,
            message: format!("{}: {status}: {message}", member.base),
        });
    }
    if matches!(status.as_u16(), 401 | 403) {
        // The operator's key for the upstream, not the client's request: every member shares
        // it, so no retry; the upstream's words stay in the logs.
        return Attempt::Refused(BackendError::Credentials(format!(
            "{}: {status}: {message}",
            member.base
        )));
    }
    // The upstream's own `param` locates the field in the same request body.
    Attempt::Refused(BackendError::Refused {
        status: status.as_u16(),
        message: format!("the upstream refused the request ({status}): {message}"),
        param,
    })
}

/// A worker that cannot load the request's LoRA adapter (`adapter_unavailable`): the adapter
/// is at fault, not the member (the others read the same files), so no ejection and no retry.
fn adapter_refusal(member: &Member, error: Option<&Value>, message: &str) -> Option<Attempt> {
    if !error.is_some_and(|v| v["error"]["code"] == "adapter_unavailable") {
        return None;
    }
    tracing::warn!(upstream = %member.base, "the worker cannot load the request's LoRA adapter: {message}");
    Some(Attempt::Refused(BackendError::Adapter(format!(
        "the LoRA adapter cannot be loaded on the worker {} (its log says why)",
        member.base
    ))))
}

/// What reading one member's answer yields: its events as they come, then how it ended.
pub(super) enum Read<T> {
    Event(T),
    /// The answer is over: whether output reached the client (after that, trying another
    /// member is no longer possible), and what went wrong if it did not end properly.
    End {
        started: bool,
        failure: Option<String>,
    },
}

/// Sends `body` to `path` on `candidates`, best first, relaying the events `read` makes of the
/// first answer; an attempt that fails before its first output (`first` names it in the logs)
/// moves on to the next member. When every member failed, the stream ends with
/// [`BackendError::NoCapacity`] if each of them had no capacity for a flex request (429
/// `resource_unavailable`; the longest `Retry-After` of theirs), [`BackendError::Overloaded`]
/// if each was busy (429 or 503), else [`BackendError::Unavailable`]. `call_span` is the span an attempt runs in; its context goes
/// upstream as `traceparent`.
#[expect(
    clippy::too_many_arguments,
    reason = "the request's parts and the two ways its kinds differ, each needed once"
)]
pub(super) fn failover<T, S>(
    client: reqwest::Client,
    candidates: Vec<Arc<Member>>,
    credentials: Credentials,
    path: String,
    body: Value,
    first: &'static str,
    call_span: impl Fn(&Member) -> tracing::Span + Send + 'static,
    read: impl Fn(&Member, reqwest::Response) -> S + Send + 'static,
) -> impl Stream<Item = Result<T, BackendError>> + Send + 'static
where
    T: Send + 'static,
    S: Stream<Item = Read<T>> + Send + 'static,
{
    async_stream::stream! {
        let mut errors = Vec::new();
        let mut overloaded = 0;
        // Members without capacity for flex, and the longest wait they asked for.
        let (mut no_capacity, mut retry_after_secs) = (0, 1);
        for member in candidates {
            let slot = InFlight::new(member.clone());
            // Open while the answer is read.
            let call = call_span(&member);
            let response = match attempt(&client, &member, &credentials, &path, &body, &call).await {
                Attempt::Stream(r) => {
                    if let Some(key) = &credentials.adapter {
                        member.note_adapter(key);
                    }
                    r
                }
                Attempt::Retry(Failed { busy, no_capacity: wait, message }) => {
                    tracing::warn!("upstream attempt failed, trying another: {message}");
                    overloaded += usize::from(busy);
                    if let Some(wait) = wait {
                        no_capacity += 1;
                        retry_after_secs = retry_after_secs.max(wait);
                    }
                    errors.push(message);
                    continue;
                }
                Attempt::Refused(e) => {
                    yield Err(e);
                    return;
                }
            };
            let mut answer = std::pin::pin!(read(&member, response));
            // A reader always ends with `End`; one that did not is taken as a clean end.
            let mut end = (true, None);
            while let Some(step) = answer.next().await {
                match step {
                    Read::Event(event) => yield Ok(event),
                    Read::End { started, failure } => {
                        end = (started, failure);
                        break;
                    }
                }
            }
            match end {
                (false, Some(e)) => {
                    // Nothing reached the client: another member may still serve it.
                    member.healthy.store(false, Ordering::Relaxed);
                    tracing::warn!("upstream failed before its first {first}, trying another: {e}");
                    errors.push(e);
                    drop(slot);
                    continue;
                }
                (true, Some(e)) => {
                    member.healthy.store(false, Ordering::Relaxed);
                    yield Err(BackendError::Broken(e));
                    return;
                }
                (_, None) => {
                    drop(slot);
                    return;
                }
            }
        }
        if no_capacity > 0 && no_capacity == errors.len() {
            yield Err(BackendError::NoCapacity { retry_after_secs });
        } else if overloaded > 0 && overloaded == errors.len() {
            yield Err(BackendError::Overloaded { retry_after_secs: 1 });
        } else {
            yield Err(BackendError::Unavailable(format!("every upstream failed: {}", errors.join("; "))));
        }
    }
}
