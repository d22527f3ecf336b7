//! The gateway's HTTP contract, driven over real sockets against a scripted backend: error
//! statuses and shapes, the exact SSE sequence, mid-stream failures, cancellation on
//! disconnect, and graceful shutdown. (The real model is exercised by the workspace's
//! end-to-end tests; here every backend behaviour can be forced.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tollgate_gateway::auth::AuthConfig;
use tollgate_gateway::backend::{
    Backend, BackendError, EventStream, FinishReason, GenerateEvent, GenerateRequest, ModelInfo,
    Prepared, Prompt, Start, Usage,
};
use tollgate_gateway::config::Config;
use tollgate_gateway::AppState;
use tollgate_metering::store::Store;

#[path = "common/serve.rs"]
mod serve;

use serve::{
    fake_model_info, serve, wait_records_where, with_default_billing, Serving, FAKE_MODEL,
};

const KEY: &str = "test-key";
const MODEL: &str = "fake";

/// Behaviour is chosen by the last message's text.
#[derive(Default)]
struct FakeBackend {
    /// Streams started and streams dropped (a dropped stream is a cancelled sequence).
    started: AtomicUsize,
    dropped: AtomicUsize,
}

struct DropCounter(Arc<FakeBackend>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

fn last_text(prompt: &Prompt) -> String {
    match prompt {
        Prompt::Chat(messages) => messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        Prompt::Text(text) => text.clone(),
    }
}

struct Shared(Arc<FakeBackend>);

#[async_trait::async_trait]
impl Backend for Shared {
    fn info(&self) -> ModelInfo {
        fake_model_info()
    }

    async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, BackendError> {
        let text = last_text(&request.prompt);
        if request.params.max_tokens.unwrap_or(0) > 60 {
            return Err(BackendError::InvalidRequest {
                message: "prompt plus max_tokens exceeds the context of 64 tokens".into(),
                param: Some("max_tokens".into()),
            });
        }
        if text == "slow-prepare" {
            // A backend that takes its time tokenizing: not the gateway's overhead.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let backend = self.0.clone();
        let start: Start = Box::new(move || {
            if text == "overload" {
                return Err(BackendError::Overloaded {
                    retry_after_secs: 2,
                });
            }
            backend.started.fetch_add(1, Ordering::SeqCst);
            Ok(script(text, DropCounter(backend)))
        });
        Ok(Prepared {
            prompt_tokens: 3,
            max_tokens: request.params.max_tokens.unwrap_or(61),
            start,
            progress: None,
            cached: None,
        })
    }
}

fn delta(text: &str, completion_tokens: u32) -> Result<GenerateEvent, BackendError> {
    Ok(GenerateEvent::Delta {
        text: text.into(),
        logprobs: vec![],
        completion_tokens,
    })
}

/// The events of one sequence, chosen by the prompt's last text.
fn script(text: String, guard: DropCounter) -> EventStream {
    let stream = async_stream::stream! {
        let _guard = guard;
        yield Ok(GenerateEvent::Started { prompt_tokens: 3 });
        match text.as_str() {
            "fail-mid" => {
                yield delta("partial", 1);
                yield Err(BackendError::Internal("device lost".into()));
            }
            "endless" => {
                let mut n = 0;
                loop {
                    n += 1;
                    yield delta("x", n);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            "slow" => {
                for n in 1..=5 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    yield delta("s", n);
                }
                yield Ok(GenerateEvent::Finished {
                    reason: FinishReason::Stop,
                    usage: Usage { prompt_tokens: 3, completion_tokens: 5, ..Default::default() },
                });
            }
            _ => {
                yield delta("Hello", 1);
                yield delta(" world", 2);
                yield Ok(GenerateEvent::Finished {
                    reason: FinishReason::Stop,
                    usage: Usage { prompt_tokens: 3, completion_tokens: 2, ..Default::default() },
                });
            }
        }
    };
    Box::pin(stream)
}

struct Server {
    addr: SocketAddr,
    backend: Arc<FakeBackend>,
    shutdown: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(server: &str) -> Server {
    start_with(server, None).await
}

/// A server metering into `store` (spool at `spool`).
async fn start_with(server: &str, billing: Option<(Store, &Path)>) -> Server {
    let config = Config::from_toml_str(&format!("{server}{FAKE_MODEL}"), Path::new(".")).unwrap();
    let backend = Arc::new(FakeBackend::default());
    let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    backends.insert(MODEL.into(), Arc::new(Shared(backend.clone())));
    let mut state = AppState::new(config, backends, AuthConfig::from_keys([KEY])).unwrap();
    if let Some((store, spool)) = billing {
        state = with_default_billing(state, store, spool).await;
    }
    let Serving {
        addr,
        shutdown,
        done,
    } = serve(state).await;
    Server {
        addr,
        backend,
        shutdown,
        done,
    }
}

async fn default_server() -> Server {
    start("[server]\nmax_n = 2\nmax_body_bytes = 4096\nshutdown_timeout_secs = 5\n").await
}

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

async fn get(addr: SocketAddr, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
}

/// A streamed chat completion of `content`.
async fn post_streamed(addr: SocketAddr, content: &str) -> reqwest::Response {
    let mut body = chat(content);
    body["stream"] = json!(true);
    post(addr, "/v1/chat/completions", &body).await
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Asserts an OpenAI-shaped error and returns its `error` object.
async fn expect_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "errors are JSON"
    );
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.unwrap();
    let error = body["error"].clone();
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(error["type"].is_string());
    error
}

#[tokio::test]
async fn non_streamed_chat_has_openai_shape() {
    let s = default_server().await;
    let r = post(s.addr, "/v1/chat/completions", &chat("hi")).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello world");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
               "prompt_tokens_details": {"cached_tokens": 0},
               "completion_tokens_details": {"accepted_prediction_tokens": 0,
                                             "rejected_prediction_tokens": 0}})
    );
}

/// Splits an SSE body into its `data:` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").map(str::to_string))
        })
        .collect()
}

#[tokio::test]
async fn stream_is_role_deltas_finish_usage_done() {
    let s = default_server().await;
    let mut body = chat("hi");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(s.addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_data(&r.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello world");
    let finishes: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finishes.len(), 1, "exactly one chunk has finish_reason");
    assert_eq!(finishes[0]["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 5);
    // Without include_usage there is no usage chunk.
    body["stream_options"] = json!(null);
    let r = post(s.addr, "/v1/chat/completions", &body).await;
    let events = sse_data(&r.text().await.unwrap());
    assert!(events.iter().all(|e| !e.contains("\"usage\":{")));
}

#[tokio::test]
async fn mid_stream_failure_is_an_error_event_before_done() {
    let s = default_server().await;
    let r = post_streamed(s.addr, "fail-mid").await;
    assert_eq!(r.status(), 200);
    let events = sse_data(&r.text().await.unwrap());
    let n = events.len();
    assert_eq!(events[n - 1], "[DONE]");
    let error: Value = serde_json::from_str(&events[n - 2]).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    assert!(
        !error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("device lost"),
        "internal details stay in the logs"
    );
    assert!(events.iter().any(|e| e.contains("partial")));
}

#[tokio::test]
async fn non_streamed_failure_is_500() {
    let s = default_server().await;
    let r = post(s.addr, "/v1/chat/completions", &chat("fail-mid")).await;
    let error = expect_error(r, 500).await;
    assert_eq!(error["type"], "server_error");
}

#[tokio::test]
async fn overload_is_503_with_retry_after() {
    let s = default_server().await;
    let r = post(s.addr, "/v1/chat/completions", &chat("overload")).await;
    assert_eq!(r.headers()["retry-after"], "2");
    expect_error(r, 503).await;
}

#[tokio::test]
async fn validation_errors_name_the_parameter() {
    let s = default_server().await;
    let cases = [
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"frequency_penalty": -3}), "frequency_penalty"),
        (json!({"presence_penalty": 2.5}), "presence_penalty"),
        (json!({"n": 3}), "n"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (json!({"max_tokens": 100}), "max_tokens"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages",
        ),
    ];
    for (overrides, param) in cases {
        let mut body = chat("hi");
        for (k, v) in overrides.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = post(s.addr, "/v1/chat/completions", &body).await;
        let error = expect_error(r, 400).await;
        assert_eq!(error["type"], "invalid_request_error", "{param}");
        assert!(
            error["param"].as_str().unwrap_or("").starts_with(param),
            "{param}: {error}"
        );
    }
    assert_eq!(
        s.backend.started.load(Ordering::SeqCst),
        0,
        "nothing reached the model"
    );
}

#[tokio::test]
async fn malformed_json_unknown_model_auth_and_size() {
    let s = default_server().await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", s.addr);
    let r = client
        .post(&url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(r, 400).await;

    let mut body = chat("hi");
    body["model"] = json!("nope");
    let error = expect_error(post(s.addr, "/v1/chat/completions", &body).await, 404).await;
    assert_eq!(error["code"], "model_not_found");

    for auth in [None, Some("wrong")] {
        let mut req = client.post(&url).json(&chat("hi"));
        if let Some(key) = auth {
            req = req.bearer_auth(key);
        }
        let error = expect_error(req.send().await.unwrap(), 401).await;
        assert_eq!(error["code"], "invalid_api_key");
    }

    let big = chat(&"x".repeat(10_000));
    let error = expect_error(post(s.addr, "/v1/chat/completions", &big).await, 413).await;
    assert!(error["message"].as_str().unwrap().contains("4096"));

    expect_error(get(s.addr, "/v1/nowhere").await, 404).await;
}

#[tokio::test]
async fn models_health_and_metrics() {
    let s = default_server().await;
    let client = reqwest::Client::new();
    let models: Value = get(s.addr, "/v1/models").await.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    let one = get(s.addr, &format!("/v1/models/{MODEL}")).await;
    assert_eq!(one.status(), 200);
    expect_error(get(s.addr, "/v1/models/nope").await, 404).await;
    let health = client
        .get(format!("http://{}/health", s.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    post(s.addr, "/v1/chat/completions", &chat("hi")).await;
    let metrics = client
        .get(format!("http://{}/metrics", s.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tollgate_requests_total",
        "tollgate_request_duration_seconds",
        "tollgate_time_to_first_token_seconds",
        "tollgate_input_tokens_total",
        "tollgate_output_tokens_total",
        "tollgate_queue_depth",
        "tollgate_running_sequences",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    assert!(metrics.contains("tollgate_output_tokens_total{model=\"fake\"} 2"));
}

/// A Prometheus sample's value: `name` with exactly these labels.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{metrics}"))
}

/// The overhead histogram counts the gateway's time and not the backend's: a backend slow to
/// prepare (300 ms) and one slow to generate (500 ms) leave it far below the request time.
#[tokio::test]
async fn gateway_overhead_leaves_out_the_backend() {
    let s = default_server().await;
    for text in ["slow-prepare", "slow"] {
        let r = post(s.addr, "/v1/chat/completions", &chat(text)).await;
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    let metrics = reqwest::get(format!("http://{}/metrics", s.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = sample(
        &metrics,
        "tollgate_gateway_overhead_seconds_count{model=\"fake\"}",
    );
    let overhead = sample(
        &metrics,
        "tollgate_gateway_overhead_seconds_sum{model=\"fake\"}",
    );
    let total = sample(
        &metrics,
        "tollgate_request_duration_seconds_sum{model=\"fake\",route=\"/v1/chat/completions\"}",
    );
    assert_eq!(count, 2.0);
    assert!(total >= 0.8, "the requests took {total}s");
    // The fake backend spends 0.8 s in all (prepare 0.3 s, generation 0.5 s): the overhead
    // leaves every bit of it out, whatever else the gateway's time was on a busy machine.
    assert!(
        overhead > 0.0 && overhead < total - 0.75,
        "overhead {overhead}s of {total}s"
    );
}

#[tokio::test]
async fn client_disconnect_cancels_the_sequence() {
    let s = default_server().await;
    let r = post_streamed(s.addr, "endless").await;
    let mut stream = r.bytes_stream();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(s.backend.dropped.load(Ordering::SeqCst), 0);
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.backend.dropped.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backend stream was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The server keeps serving.
    let r = post(s.addr, "/v1/chat/completions", &chat("hi")).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn shutdown_lets_in_flight_streams_finish() {
    let mut s = default_server().await;
    let r = post_streamed(s.addr, "slow").await;
    assert_eq!(r.status(), 200);
    s.shutdown.take().unwrap().send(()).unwrap();
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(
        sse_data(&text)
            .iter()
            .filter(|e| e.contains("\"content\":\"s\""))
            .count(),
        5
    );
    s.done.await.unwrap().unwrap();
    // New connections are refused once the server is down.
    assert!(reqwest::Client::new()
        .get(format!("http://{}/health", s.addr))
        .send()
        .await
        .is_err());
}

#[tokio::test]
async fn shutdown_timeout_drops_endless_streams() {
    let mut s = start("[server]\nshutdown_timeout_secs = 1\n").await;
    let r = post_streamed(s.addr, "endless").await;
    s.shutdown.take().unwrap().send(()).unwrap();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), s.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    drop(r);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.backend.dropped.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn ledger_records_completed_failed_and_cancelled_but_not_unstarted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(dir.path().join("l.db").to_str().unwrap())
        .await
        .unwrap();
    let spool = dir.path().join("l.spool");
    let mut s = start_with(
        "[server]\nshutdown_timeout_secs = 5\n",
        Some((store.clone(), &spool)),
    )
    .await;
    // Completed: 3 prompt + 2 output tokens at 1 and 2 USD per million = 7,000 nano-USD.
    let ok = post(s.addr, "/v1/chat/completions", &chat("hi")).await;
    assert_eq!(ok.status(), 200);
    let ok_id = ok.headers()["x-request-id"].to_str().unwrap().to_string();
    // Failed after one token: recorded, not charged.
    let failed = post(s.addr, "/v1/chat/completions", &chat("fail-mid")).await;
    assert_eq!(failed.status(), 500);
    let failed_id = failed.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    // Never started (overloaded): no record.
    let overloaded = post(s.addr, "/v1/chat/completions", &chat("overload")).await;
    assert_eq!(overloaded.status(), 503);
    // Cancelled mid-stream: billed for the tokens generated before the engine stopped.
    let r = post_streamed(s.addr, "endless").await;
    let cancelled_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut stream = r.bytes_stream();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);

    wait_records_where(&store, 3, |_| true).await;
    // A graceful shutdown writes every record still pending before it returns, so what the
    // ledger holds after it is all there will ever be: no fourth record (the unstarted one).
    s.shutdown.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), &mut s.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (records, _) = store.records_after(0, 100).await.unwrap();
    assert_eq!(records.len(), 3, "exactly three records");
    let by_id = |id: &str| records.iter().find(|r| r.id == id).unwrap().clone();
    let ok = by_id(&ok_id);
    assert_eq!(
        (
            ok.status.as_str(),
            ok.input_tokens,
            ok.output_tokens,
            ok.cost_nano_usd
        ),
        ("completed", 3, 2, 7_000)
    );
    assert_eq!(ok.finish_reason.map(|f| f.as_str()), Some("stop"));
    assert_eq!((ok.customer_id.as_str(), ok.stream), ("default", false));
    assert_eq!(
        (
            ok.input_price_per_mtok.to_string(),
            ok.output_price_per_mtok.to_string()
        ),
        ("1".to_string(), "2".to_string())
    );
    let failed = by_id(&failed_id);
    assert_eq!(
        (
            failed.status.as_str(),
            failed.output_tokens,
            failed.cost_nano_usd
        ),
        ("failed", 1, 0)
    );
    let cancelled = by_id(&cancelled_id);
    assert_eq!(cancelled.status.as_str(), "cancelled");
    assert!(cancelled.stream && cancelled.output_tokens >= 1);
    assert_eq!(
        cancelled.cost_nano_usd,
        3_000 + 2_000 * cancelled.output_tokens
    );
}

/// While the models load, the port answers 503 (`/health` says `loading`, the API an OpenAI
/// error with `Retry-After`); then the same socket is handed over for serving.
#[tokio::test]
async fn answers_503_while_loading_then_hands_over_the_socket() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (finish, loaded) = oneshot::channel::<u32>();
    let task = tokio::spawn(tollgate_gateway::answer_while_loading(
        listener,
        async { Ok(loaded.await?) },
        std::future::pending(),
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let health = || async {
        client
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .unwrap()
    };
    let r = health().await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "loading");
    let r = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");

    finish.send(7).unwrap();
    let (listener, loaded) = task.await.unwrap().unwrap().expect("loaded");
    assert_eq!(loaded, 7);
    assert_eq!(listener.local_addr().unwrap(), addr);
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ready" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let r = health().await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ready");
}

/// A shutdown signal during loading ends it without serving.
#[tokio::test]
async fn shutdown_while_loading_returns_none() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let loaded = tollgate_gateway::answer_while_loading(
        listener,
        std::future::pending::<anyhow::Result<()>>(),
        async {},
    )
    .await
    .unwrap();
    assert!(loaded.is_none());
}

/// With a listener of their own, the admin API and the metrics leave the public port; both
/// ports answer `/health`, and both stop on the shutdown signal.
#[tokio::test]
async fn operator_endpoints_can_have_their_own_port() {
    let config = Config::from_toml_str(
        &format!("[server]\nshutdown_timeout_secs = 5\n{FAKE_MODEL}"),
        Path::new("."),
    )
    .unwrap();
    let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    backends.insert(
        MODEL.into(),
        Arc::new(Shared(Arc::new(FakeBackend::default()))),
    );
    let state = AppState::new(config, backends, AuthConfig::from_keys([KEY]))
        .unwrap()
        .with_admin_token(Some("admin-secret".into()));
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let operator = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (public_addr, operator_addr) =
        (public.local_addr().unwrap(), operator.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(tollgate_gateway::run_split(
        public,
        Some(operator),
        state,
        async move {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::new();
    let admin_get = |addr: SocketAddr, path: &'static str| {
        client
            .get(format!("http://{addr}{path}"))
            .bearer_auth("admin-secret")
            .send()
    };
    let status = |addr: SocketAddr, path: &'static str| {
        let response = admin_get(addr, path);
        async move { response.await.unwrap().status() }
    };
    let chat_status = |addr: SocketAddr| async move {
        post(addr, "/v1/chat/completions", &chat("hi"))
            .await
            .status()
    };
    assert_eq!(status(public_addr, "/metrics").await, 404);
    assert_eq!(status(public_addr, "/admin/v1/customers").await, 404);
    assert_eq!(status(public_addr, "/health").await, 200);
    assert_eq!(chat_status(public_addr).await, 200);
    let metrics = admin_get(operator_addr, "/metrics").await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics
        .text()
        .await
        .unwrap()
        .contains("tollgate_requests_total"));
    assert_eq!(status(operator_addr, "/health").await, 200);
    // The admin API is there (without a database it says so), and not the OpenAI API.
    assert_ne!(status(operator_addr, "/admin/v1/customers").await, 404);
    assert_eq!(chat_status(operator_addr).await, 404);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("both servers stop")
        .unwrap()
        .unwrap();
    assert!(client
        .get(format!("http://{operator_addr}/health"))
        .send()
        .await
        .is_err());
}
