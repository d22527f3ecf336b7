//! The slow upstream behind `--slow-streams`: an OpenAI-compatible server on loopback whose
//! streams send one piece ([`held::PIECE`], one token) every 100 ms until it is released, then
//! the finish, the usage (one completion token per piece) and `data: [DONE]`. It serves on a
//! thread and runtime of its own, stopped when dropped, and counts the pieces it sent, so the
//! benchmark can check that every one reached its client.
//!
//! It only streams (the gateway always streams from its upstreams) and answers `GET /health`.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::held::{Side, PIECE};
use super::{PROMPT_TOKENS, UPSTREAM_KEY};

/// How often a slow stream sends a piece.
pub const PIECE_EVERY: Duration = Duration::from_millis(100);

/// A started slow upstream.
pub struct SlowUpstream {
    pub addr: SocketAddr,
    released: watch::Sender<bool>,
    pieces: Arc<AtomicU64>,
    // Last: stops the server once the rest is gone.
    _side: Side,
}

struct Shared {
    released: watch::Receiver<bool>,
    pieces: Arc<AtomicU64>,
}

impl SlowUpstream {
    pub fn start() -> std::io::Result<Self> {
        let listener = StdListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (released, watching) = watch::channel(false);
        let pieces = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            released: watching,
            pieces: pieces.clone(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .with_state(shared);
        let side = Side::start("slow-upstream")?;
        side.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                }),
                Err(e) => return eprintln!("the slow upstream did not start: {e}"),
            };
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("the slow upstream stopped: {e}");
            }
        });
        Ok(Self {
            addr,
            released,
            pieces,
            _side: side,
        })
    }

    /// Ends every stream, open or yet to come, after its current piece.
    pub fn release(&self) {
        let _ = self.released.send(true);
    }

    /// Pieces sent so far.
    pub fn pieces(&self) -> u64 {
        self.pieces.load(Ordering::Relaxed)
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let error = json!({"error": {"message": message, "type": "invalid_request_error"}});
    (status, Json(error)).into_response()
}

async fn chat(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let expected = format!("Bearer {UPSTREAM_KEY}");
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(&expected)
    {
        return refuse(StatusCode::UNAUTHORIZED, "incorrect upstream key");
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if request["stream"] != true {
        return refuse(StatusCode::BAD_REQUEST, "this upstream only streams");
    }
    let model = request["model"].as_str().unwrap_or_default().to_string();
    let include_usage = request["stream_options"]["include_usage"] == true;
    let mut released = s.released.clone();
    let counter = s.pieces.clone();
    let events = async_stream::stream! {
        let role = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]);
        yield Ok::<_, Infallible>(event(&model, role, Value::Null));
        // The first tick is at once: the first piece follows the role chunk.
        let mut tick = tokio::time::interval(PIECE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pieces = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = released.wait_for(|r| *r) => break,
            }
            pieces += 1;
            counter.fetch_add(1, Ordering::Relaxed);
            let piece = json!([{"index": 0, "delta": {"content": PIECE}, "finish_reason": null}]);
            yield Ok(event(&model, piece, Value::Null));
        }
        let finish = json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]);
        yield Ok(event(&model, finish, Value::Null));
        if include_usage {
            let usage = json!({
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": pieces,
                "total_tokens": PROMPT_TOKENS + pieces,
            });
            yield Ok(event(&model, json!([]), usage));
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

/// One `chat.completion.chunk` event.
fn event(model: &str, choices: Value, usage: Value) -> Bytes {
    let chunk = json!({
        "id": "chatcmpl-slow",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": choices,
        "usage": usage,
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::held::{open_idle, recheck_idle, slow_stream, Endpoint};
    use super::*;

    fn to(addr: SocketAddr, key: &str) -> Endpoint {
        Endpoint {
            addr,
            path: "/v1/chat/completions".into(),
            auth: format!("Bearer {key}"),
        }
    }

    fn body(stream: bool) -> Bytes {
        let b = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "stream": stream, "stream_options": {"include_usage": true}});
        Bytes::from(b.to_string())
    }

    /// A stream reads every piece the upstream sent, until the release, then `[DONE]`.
    #[tokio::test]
    async fn a_slow_stream_carries_every_piece_until_released() {
        let up = SlowUpstream::start().unwrap();
        let started = Arc::new(AtomicU64::new(0));
        let stream = tokio::spawn(slow_stream(
            to(up.addr, UPSTREAM_KEY),
            body(true),
            started.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        while started.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(PIECE_EVERY * 2).await;
        up.release();
        let end = stream.await.unwrap().unwrap();
        // At least the first piece (the stream had started); every piece sent was read.
        assert!(end.pieces >= 1, "{end:?}");
        assert_eq!(end.pieces, up.pieces());
    }

    /// Refused requests and closed connections are errors, counted per connection.
    #[tokio::test]
    async fn refusals_and_closed_connections_are_errors() {
        let up = SlowUpstream::start().unwrap();
        // Not streamed: refused (400); a wrong key: refused (401).
        let (open, errors) = open_idle(to(up.addr, UPSTREAM_KEY), body(false), 3).await;
        assert_eq!((open.len(), errors.count()), (0, 3));
        assert!(errors.sorted()[0].0.contains("HTTP 400"), "{errors:?}");
        let started = Arc::new(AtomicU64::new(0));
        let refused = slow_stream(to(up.addr, "wrong"), body(true), started).await;
        assert!(refused.unwrap_err().contains("HTTP 401"));
        // A connection the server closes after its first answer fails its second request.
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let closer = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut conn, _) = server.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
            std::thread::sleep(Duration::from_millis(100));
        });
        let (open, errors) = open_idle(to(addr, "k"), body(false), 1).await;
        assert_eq!((open.len(), errors.count()), (1, 0));
        closer.join().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (answered, errors) = recheck_idle(to(addr, "k"), body(false), open).await;
        assert_eq!((answered, errors.count()), (0, 1));
    }
}
