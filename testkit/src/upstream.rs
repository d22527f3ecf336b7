//! A fake OpenAI-compatible upstream on loopback: `POST /v1/chat/completions` and `GET /health`.
//!
//! It answers at once, with no model behind it, so what a test or a benchmark measures is the
//! gateway in front of it. Its [`Behaviour`] is fixed for its lifetime: a reply (as a JSON
//! `chat.completion`, or as `chat.completion.chunk` events ending in `data: [DONE]` when the
//! request asks to stream), a failure before the first byte, or a stream cut off midway.
//!
//! It counts the chat requests it received ([`Running::hits`]), so a caller can check how many
//! attempts the gateway made.

use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Value};

/// The `id` of every completion the fake returns.
const COMPLETION_ID: &str = "chatcmpl-fake";

/// What the fake upstream does with every chat request.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Answers with this reply.
    Answers(Reply),
    /// 500 with a plain-text body on every request.
    Broken,
    /// One content chunk `Hel`, then the connection ends without a finish or `[DONE]`.
    DiesMidStream,
    /// 400 with an OpenAI error: `context length exceeded`.
    Refuses,
    /// This status with an OpenAI error whose message names a secret of the upstream's
    /// (`sk-up-123`), so a test can check the gateway does not pass it on to its client.
    Status(u16),
    /// 429 `resource_unavailable` with `Retry-After: 7`: what a `tollgate worker` (and OpenAI)
    /// answers a `flex` request it found no capacity for.
    NoCapacity,
}

/// A successful answer: its text in pieces (one chunk each when streamed), and the usage the
/// upstream reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Whether a stream starts with a chunk holding only `role: assistant`, as OpenAI's do.
    pub role_chunk: bool,
    /// The content, one streamed chunk per piece.
    pub pieces: Vec<String>,
    /// The `usage` object: in the JSON answer, and in a streamed answer's last chunk when the
    /// request asked for it (`stream_options.include_usage`). `None` reports no usage at all.
    pub usage: Option<Value>,
}

impl Reply {
    /// A reply of these pieces, with a role chunk first and no usage.
    pub fn pieces<S: Into<String>>(pieces: impl IntoIterator<Item = S>) -> Self {
        Self {
            role_chunk: true,
            pieces: pieces.into_iter().map(Into::into).collect(),
            usage: None,
        }
    }

    /// The usage the upstream reports: these prompt tokens and one completion token per piece.
    pub fn with_counted_usage(mut self, prompt_tokens: u64) -> Self {
        let completion = self.pieces.len() as u64;
        self.usage = Some(json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }));
        self
    }

    /// This `usage` object as is, however odd (a test of what the gateway makes of it).
    pub fn with_usage(mut self, usage: Option<Value>) -> Self {
        self.usage = usage;
        self
    }

    /// Without the leading role chunk.
    pub fn without_role_chunk(mut self) -> Self {
        self.role_chunk = false;
        self
    }

    /// The whole content.
    pub fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// A fake upstream, configured before it is started.
#[derive(Debug, Clone)]
pub struct FakeUpstream {
    behaviour: Behaviour,
    api_key: Option<String>,
    require_stream: bool,
}

impl FakeUpstream {
    pub fn new(behaviour: Behaviour) -> Self {
        Self {
            behaviour,
            api_key: None,
            require_stream: false,
        }
    }

    /// Refuses (401) a request without `Authorization: Bearer KEY`, so a caller sees whether
    /// the gateway sends its configured upstream key.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Refuses (400) a request that does not ask for a stream with usage. The gateway always
    /// streams from its upstreams, to fail over before the first token and to bill what
    /// streamed by; a test upstream in strict mode holds it to that.
    pub fn requiring_stream(mut self) -> Self {
        self.require_stream = true;
        self
    }

    fn router(self, hits: Arc<AtomicU64>) -> Router {
        let state = Arc::new(Shared {
            behaviour: self.behaviour,
            auth: self.api_key.map(|k| format!("Bearer {k}")),
            require_stream: self.require_stream,
            hits,
        });
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .with_state(state)
    }

    /// Serves on the current tokio runtime until it shuts down (the end of a `#[tokio::test]`).
    pub async fn spawn(self) -> io::Result<Running> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        let app = self.router(hits.clone());
        tokio::spawn(serve(listener, app));
        Ok(Running { addr, hits })
    }

    /// Serves on a thread of its own with a single-threaded runtime, for the rest of the
    /// process: a load generator's tasks then never delay the upstream's answers in the queue
    /// of a shared runtime.
    pub fn spawn_thread(self) -> io::Result<Running> {
        let listener = StdListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        let app = self.router(hits.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("fake-upstream".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => serve(l, app).await,
                        Err(e) => eprintln!("the fake upstream did not start: {e}"),
                    }
                });
            })?;
        Ok(Running { addr, hits })
    }
}

/// Serves `app`, replies unbuffered by Nagle's algorithm (small responses on loopback would
/// otherwise wait for the client's delayed ACK).
async fn serve(listener: tokio::net::TcpListener, app: Router) {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("the fake upstream stopped: {e}");
    }
}

/// A started fake upstream.
#[derive(Debug, Clone)]
pub struct Running {
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
}

impl Running {
    /// `http://ADDR`, without a path.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ADDR/v1`, the form of an OpenAI base URL.
    pub fn v1_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Chat requests received so far, refused ones included.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// The counter behind [`Self::hits`].
    pub fn hit_counter(&self) -> Arc<AtomicU64> {
        self.hits.clone()
    }
}

struct Shared {
    behaviour: Behaviour,
    /// The `Authorization` header a request must carry, if any.
    auth: Option<String>,
    require_stream: bool,
    hits: Arc<AtomicU64>,
}

fn openai_error(status: StatusCode, body: Value) -> Response {
    (status, Json(json!({ "error": body }))).into_response()
}

fn invalid(message: &str) -> Response {
    openai_error(
        StatusCode::BAD_REQUEST,
        json!({"message": message, "type": "invalid_request_error"}),
    )
}

async fn chat(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    if let Some(auth) = &s.auth {
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if sent != Some(auth.as_str()) {
            return openai_error(
                StatusCode::UNAUTHORIZED,
                json!({"message": "incorrect upstream key", "type": "invalid_request_error"}),
            );
        }
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return invalid(&e.to_string()),
    };
    let model = request["model"].as_str().unwrap_or_default();
    if request["messages"].as_array().is_none_or(Vec::is_empty) {
        return invalid("`messages` must be a non-empty array");
    }
    let stream = request["stream"] == true;
    let include_usage = request["stream_options"]["include_usage"] == true;
    if s.require_stream && !(stream && include_usage) {
        return invalid("this upstream expects `stream` with `stream_options.include_usage`");
    }
    match &s.behaviour {
        Behaviour::Answers(reply) if stream => {
            event_stream(reply_events(reply, model, include_usage), true)
        }
        Behaviour::Answers(reply) => (
            [(header::CONTENT_TYPE, "application/json")],
            json_reply(reply, model),
        )
            .into_response(),
        Behaviour::Broken => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Behaviour::DiesMidStream => {
            let events = [chunk(model, delta("Hel"), Value::Null)];
            event_stream(events.to_vec(), false)
        }
        Behaviour::Refuses => invalid("context length exceeded"),
        Behaviour::Status(code) => openai_error(
            StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            json!({"message": "upstream secret: key sk-up-123 rejected", "param": "model"}),
        ),
        Behaviour::NoCapacity => {
            let mut r = openai_error(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"message": "no capacity for flex", "type": "server_error",
                       "code": "resource_unavailable"}),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("7"));
            r
        }
    }
}

fn json_reply(reply: &Reply, model: &str) -> String {
    json!({
        "id": COMPLETION_ID,
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.text()},
            "finish_reason": "stop",
        }],
        "usage": reply.usage,
    })
    .to_string()
}

fn delta(content: &str) -> Value {
    json!([{"index": 0, "delta": {"content": content}, "finish_reason": null}])
}

fn chunk(model: &str, choices: Value, usage: Value) -> Value {
    json!({
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": choices,
        "usage": usage,
    })
}

/// A stream's events: the role chunk, one chunk per piece, the finish, and the usage when asked.
fn reply_events(reply: &Reply, model: &str, include_usage: bool) -> Vec<Value> {
    let mut events = Vec::with_capacity(reply.pieces.len() + 3);
    if reply.role_chunk {
        events.push(chunk(
            model,
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
            Value::Null,
        ));
    }
    for piece in &reply.pieces {
        events.push(chunk(model, delta(piece), Value::Null));
    }
    events.push(chunk(
        model,
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        Value::Null,
    ));
    if let (true, Some(usage)) = (include_usage, &reply.usage) {
        events.push(chunk(model, json!([]), usage.clone()));
    }
    events
}

/// The whole stream in one body: the events, then `data: [DONE]` when `done` (without it, the
/// stream ends as if the connection were cut).
fn event_stream(events: Vec<Value>, done: bool) -> Response {
    let mut out = String::with_capacity(256 * (events.len() + 1));
    for e in &events {
        let _ = write!(out, "data: {e}\n\n");
    }
    if done {
        out.push_str("data: [DONE]\n\n");
    }
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from(out),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_holds_the_pieces_then_the_finish_then_the_usage() {
        let reply = Reply::pieces(["Hel", "lo"]).with_counted_usage(3);
        let events = reply_events(&reply, "m", true);
        assert_eq!(events.len(), 5);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[2]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(events[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[4]["usage"]["total_tokens"], 5);
        // Not asked for: no usage chunk.
        assert_eq!(reply_events(&reply, "m", false).len(), 4);
        let bare = reply.without_role_chunk().with_usage(None);
        assert_eq!(reply_events(&bare, "m", true).len(), 3);
    }
}
