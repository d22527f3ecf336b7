//! The gateway in front of OpenAI-compatible upstreams over real sockets: failover before the
//! first token, usage taken from the upstream, mid-stream failures as error events, upstream
//! refusals passed through.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tollgate_gateway::auth::AuthConfig;
use tollgate_gateway::backend::upstream::{Discovery, UpstreamPool};
use tollgate_gateway::backend::{Backend, ModelInfo};
use tollgate_gateway::config::Config;
use tollgate_gateway::AppState;

const KEY: &str = "k";

#[derive(Clone, Copy)]
enum Behaviour {
    Good,
    /// 500 on every request.
    Broken,
    /// One chunk, then the connection ends without a finish.
    DiesMidStream,
    /// 400 with an OpenAI error.
    Refuses,
    /// This status with an OpenAI error naming a secret of the upstream's.
    Status(u16),
    /// Three content chunks, then this `usage` object (JSON text), or none when empty.
    Reports(&'static str),
    /// Three chunks of three words each, and no `usage`.
    Words,
}

#[derive(Clone)]
struct Fake {
    behaviour: Behaviour,
    hits: Arc<AtomicUsize>,
}

fn sse(events: &[Value], done: bool) -> String {
    let mut out: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    if done {
        out.push_str("data: [DONE]\n\n");
    }
    out
}

async fn chat(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    fake.hits.fetch_add(1, Ordering::SeqCst);
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    let delta = |text: &str| json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    let body = match fake.behaviour {
        Behaviour::Broken => return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Behaviour::Refuses => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"message": "context length exceeded", "type": "invalid_request_error"}})),
            )
                .into_response()
        }
        Behaviour::Status(code) => {
            return (
                StatusCode::from_u16(code).unwrap(),
                Json(json!({"error": {"message": "upstream secret: key sk-up-123 rejected", "param": "model"}})),
            )
                .into_response()
        }
        Behaviour::DiesMidStream => sse(&[delta("Hel")], false),
        Behaviour::Reports(usage) => {
            let mut events = vec![
                delta("Hel"),
                delta("lo"),
                delta(" world"),
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            ];
            if !usage.is_empty() {
                let usage: Value = serde_json::from_str(usage).unwrap();
                events.push(json!({"choices": [], "usage": usage}));
            }
            sse(&events, true)
        }
        Behaviour::Words => sse(
            &[
                delta("one two three"),
                delta(" four five six"),
                delta(" seven eight nine"),
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            ],
            true,
        ),
        Behaviour::Good => sse(
            &[
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
                delta("Hello"),
                delta(" world"),
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}),
            ],
            true,
        ),
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from(body))
        .unwrap()
}

async fn upstream(behaviour: Behaviour) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/chat/completions", post(chat))
        .with_state(Fake {
            behaviour,
            hits: hits.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), hits)
}

async fn gateway(urls: Vec<String>) -> SocketAddr {
    gateway_with(urls, Discovery::Static).await
}

async fn gateway_with(urls: Vec<String>, discovery: Discovery) -> SocketAddr {
    gateway_counting(urls, discovery, None).await
}

/// A stand-in tokenizer: one token per word or punctuation run, like a word-level vocabulary.
struct Words;

impl tollgate_gateway::backend::TokenCounter for Words {
    fn count(&self, text: &str) -> u32 {
        text.split(|c: char| c.is_whitespace())
            .filter(|w| !w.is_empty())
            .count() as u32
    }
}

async fn gateway_counting(
    urls: Vec<String>,
    discovery: Discovery,
    counter: Option<Arc<dyn tollgate_gateway::backend::TokenCounter>>,
) -> SocketAddr {
    let config = Config::from_toml_str(
        r#"
[models.up]
backend = { type = "http", urls = ["http://unused"] }
"#,
        Path::new("."),
    )
    .unwrap();
    let info = ModelInfo {
        id: "up".into(),
        context_length: 4096,
        created: 0,
        owned_by: "tests".into(),
    };
    let mut pool = UpstreamPool::new(info, "up".into(), &urls, None, discovery).unwrap();
    if let Some(counter) = counter {
        pool = pool.with_token_counter(counter);
    }
    let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    backends.insert("up".into(), Arc::new(pool));
    let state = AppState::new(config, backends, AuthConfig::from_keys([KEY])).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tollgate_gateway::run(
        listener,
        state,
        std::future::pending(),
    ));
    addr
}

async fn ask(addr: SocketAddr, stream: bool) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(
            &json!({"model": "up", "stream": stream, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn fails_over_before_the_first_token_and_bills_upstream_usage() {
    let (broken, broken_hits) = upstream(Behaviour::Broken).await;
    let (dies, _) = upstream(Behaviour::DiesMidStream).await;
    let (good, good_hits) = upstream(Behaviour::Good).await;
    // A port nobody listens on, a 500, and one that dies: each is tried at most until the
    // good one answers; the client never sees them.
    let dead = "http://127.0.0.1:9/v1".to_string();
    let addr = gateway(vec![dead, broken, good]).await;
    for _ in 0..6 {
        let r = ask(addr, false).await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "Hello world");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
    }
    assert_eq!(good_hits.load(Ordering::SeqCst), 6);
    // Once ejected, the broken member is not tried first again.
    assert!(
        broken_hits.load(Ordering::SeqCst) <= 2,
        "{}",
        broken_hits.load(Ordering::SeqCst)
    );
    let r = ask(addr, true).await;
    let text = r.text().await.unwrap();
    assert!(text.contains("\"Hello\"") && text.contains("\"prompt_tokens\":5"));
    assert!(text.trim_end().ends_with("data: [DONE]"));
    drop(dies);
}

#[tokio::test]
async fn an_upstream_never_bills_fewer_output_tokens_than_streamed_by() {
    // Three content chunks each time; what the upstream says about them varies.
    let cases = [
        // No `usage` at all: the prompt as the gateway bounded it, three output tokens.
        ("", None, 3, 0),
        ("{\"prompt_tokens\": 6, \"completion_tokens\": null}", Some(6), 3, 0),
        ("{\"prompt_tokens\": 6, \"completion_tokens\": 0}", Some(6), 3, 0),
        ("{\"prompt_tokens\": 6, \"completion_tokens\": 1}", Some(6), 3, 0),
        // A larger figure is the upstream's (a chunk may hold several tokens), and so are
        // its cached prompt tokens.
        (
            "{\"prompt_tokens\": 6, \"completion_tokens\": 5, \"prompt_tokens_details\": {\"cached_tokens\": 4}}",
            Some(6),
            5,
            4,
        ),
    ];
    for (usage, prompt, completion, cached) in cases {
        let (url, _) = upstream(Behaviour::Reports(usage)).await;
        let addr = gateway(vec![url]).await;
        for stream in [false, true] {
            let r = ask(addr, stream).await;
            assert_eq!(r.status(), 200);
            let got: Value = if stream {
                let text = r.text().await.unwrap();
                let last = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .rfind(|d| *d != "[DONE]")
                    .unwrap()
                    .to_string();
                serde_json::from_str::<Value>(&last).unwrap()["usage"].clone()
            } else {
                r.json::<Value>().await.unwrap()["usage"].clone()
            };
            assert_eq!(got["completion_tokens"], completion, "usage {usage}: {got}");
            assert_eq!(
                got["prompt_tokens_details"]["cached_tokens"], cached,
                "usage {usage}: {got}"
            );
            match prompt {
                Some(p) => assert_eq!(got["prompt_tokens"], p, "usage {usage}: {got}"),
                // The gateway's upper bound of "hi" in a chat: at least its bytes.
                None => assert!(got["prompt_tokens"].as_u64().unwrap() >= 2, "{got}"),
            }
        }
    }
}

#[tokio::test]
async fn with_the_models_tokenizer_what_streamed_by_is_counted_in_tokens() {
    // Three chunks, "Hel", "lo", " world": three words by the stand-in tokenizer; a chunk
    // without a whole word still counts one.
    let cases = [
        ("", 3),
        ("{\"prompt_tokens\": 6, \"completion_tokens\": 0}", 3),
        ("{\"prompt_tokens\": 6, \"completion_tokens\": 2}", 3),
        // At least what was seen: the upstream's own figure.
        ("{\"prompt_tokens\": 6, \"completion_tokens\": 4}", 4),
    ];
    for (usage, completion) in cases {
        let (url, _) = upstream(Behaviour::Reports(usage)).await;
        let addr = gateway_counting(vec![url], Discovery::Static, Some(Arc::new(Words))).await;
        let got: Value = ask(addr, false).await.json().await.unwrap();
        assert_eq!(
            got["usage"]["completion_tokens"], completion,
            "usage {usage}: {got}"
        );
    }
    // Chunks of several words: the tokenizer's count, above the chunk count.
    let (url, _) = upstream(Behaviour::Words).await;
    let addr = gateway_counting(vec![url], Discovery::Static, Some(Arc::new(Words))).await;
    let got: Value = ask(addr, false).await.json().await.unwrap();
    assert_eq!(got["usage"]["completion_tokens"], 9, "{got}");
    // Without a tokenizer the same stream is three chunks.
    let (url, _) = upstream(Behaviour::Words).await;
    let addr = gateway(vec![url]).await;
    let got: Value = ask(addr, false).await.json().await.unwrap();
    assert_eq!(got["usage"]["completion_tokens"], 3, "{got}");
}

#[tokio::test]
async fn a_failure_after_text_is_an_error_event() {
    let (dies, _) = upstream(Behaviour::DiesMidStream).await;
    let addr = gateway(vec![dies]).await;
    let text = ask(addr, true).await.text().await.unwrap();
    assert!(text.contains("\"Hel\""), "{text}");
    assert!(text.contains("\"error\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
}

#[tokio::test]
async fn upstream_refusals_are_client_errors_and_not_retried() {
    let (refuses, hits) = upstream(Behaviour::Refuses).await;
    let (good, good_hits) = upstream(Behaviour::Good).await;
    let addr = gateway(vec![refuses, good]).await;
    let mut refused = 0;
    for _ in 0..4 {
        let r = ask(addr, false).await;
        if r.status() == 400 {
            let body: Value = r.json().await.unwrap();
            assert!(body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("context length exceeded"));
            refused += 1;
        } else {
            assert_eq!(r.status(), 200);
        }
    }
    assert_eq!(refused, hits.load(Ordering::SeqCst));
    assert_eq!(
        refused + good_hits.load(Ordering::SeqCst),
        4,
        "no retries after a 400"
    );
    assert!(refused > 0);
}

#[tokio::test]
async fn refused_credentials_are_a_502_that_keeps_the_upstreams_words_to_the_logs() {
    for code in [401, 403] {
        let (refuses, hits) = upstream(Behaviour::Status(code)).await;
        let addr = gateway(vec![refuses]).await;
        let r = ask(addr, false).await;
        assert_eq!(r.status(), 502, "upstream {code}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_credentials", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("misconfigured"), "{message}");
        assert!(!message.contains("sk-up-123"), "{message}");
        assert_eq!(hits.load(Ordering::SeqCst), 1, "not retried");
    }
}

#[tokio::test]
async fn other_client_errors_of_the_upstream_keep_their_status() {
    for code in [404, 413, 422] {
        let (refuses, _) = upstream(Behaviour::Status(code)).await;
        let addr = gateway(vec![refuses]).await;
        let r = ask(addr, false).await;
        assert_eq!(r.status(), code);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["param"], "model", "{body}");
    }
}

#[tokio::test]
async fn all_members_down_is_unavailable_and_shows_in_the_metrics() {
    let addr = gateway(vec!["http://127.0.0.1:9".into()]).await;
    let r = ask(addr, false).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable");
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_backend_healthy{backend=\"http://127.0.0.1:9\",model=\"up\"} 0"),
        "{metrics}"
    );
}

/// With DNS discovery the members are the addresses the host name resolves to (`localhost`
/// here, served on 127.0.0.1), found by the background task before requests are routed.
#[tokio::test]
async fn dns_discovery_routes_to_the_resolved_addresses() {
    let (good, hits) = upstream(Behaviour::Good).await;
    let by_name = good.replace("127.0.0.1", "localhost");
    let addr = gateway_with(vec![by_name], Discovery::Dns).await;
    let metrics = || async {
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let port = good
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/v1")
        .to_string();
    let member = format!("backend=\"http://127.0.0.1:{port}\"");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !metrics().await.lines().any(|l| {
        l.starts_with("tollgate_backend_healthy") && l.contains(&member) && l.ends_with(" 1")
    }) {
        assert!(std::time::Instant::now() < deadline, "{}", metrics().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        assert_eq!(ask(addr, false).await.status(), 200);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}
