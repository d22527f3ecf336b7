//! The scripted backend: its behaviour is chosen by the last message's text; a server serving
//! it on an ephemeral port, and the requests the tests send.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

use super::serve::{fake_model_info, serve, with_default_billing, Serving, FAKE_MODEL};

pub const KEY: &str = "test-key";
pub const MODEL: &str = "fake";

/// Behaviour is chosen by the last message's text.
#[derive(Default)]
pub struct FakeBackend {
    /// Streams started and streams dropped (a dropped stream is a cancelled sequence).
    pub started: AtomicUsize,
    pub dropped: AtomicUsize,
}

pub struct DropCounter(Arc<FakeBackend>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn last_text(prompt: &Prompt) -> String {
    match prompt {
        Prompt::Chat(messages) => messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        Prompt::Text(text) => text.clone(),
    }
}

pub struct Shared(pub Arc<FakeBackend>);

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

pub fn delta(text: &str, completion_tokens: u32) -> Result<GenerateEvent, BackendError> {
    Ok(GenerateEvent::Delta {
        text: text.into(),
        logprobs: vec![],
        completion_tokens,
    })
}

/// The events of one sequence, chosen by the prompt's last text.
pub fn script(text: String, guard: DropCounter) -> EventStream {
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

pub struct Server {
    pub addr: SocketAddr,
    pub backend: Arc<FakeBackend>,
    pub shutdown: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn start(server: &str) -> Server {
    start_with(server, None).await
}

/// A server metering into `store` (spool at `spool`).
pub async fn start_with(server: &str, billing: Option<(Store, &Path)>) -> Server {
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

pub async fn default_server() -> Server {
    start("[server]\nmax_n = 2\nmax_body_bytes = 4096\nshutdown_timeout_secs = 5\n").await
}

pub fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

pub async fn get(addr: SocketAddr, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
}

/// A streamed chat completion of `content`.
pub async fn post_streamed(addr: SocketAddr, content: &str) -> reqwest::Response {
    let mut body = chat(content);
    body["stream"] = json!(true);
    post(addr, "/v1/chat/completions", &body).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Asserts an OpenAI-shaped error and returns its `error` object.
pub async fn expect_error(response: reqwest::Response, status: u16) -> Value {
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

/// Splits an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").map(str::to_string))
        })
        .collect()
}
