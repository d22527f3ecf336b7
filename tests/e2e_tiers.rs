//! Service tiers end to end, with the real model behind `tollgate::serve` on an ephemeral port:
//! a `flex` request that the engine cannot admit within the model's `flex_max_wait_secs` is
//! refused with 429 `resource_unavailable` and `Retry-After` (never started), and a stream
//! paused by a `priority` request gets `: keep-alive` comments and goes on once it may.
//!
//! The KV budget holds one long request and not two, so a second request waits (or, of a higher
//! class, preempts the first) by construction; the long ones ban the end tokens with
//! `logit_bias`, so they are still running when the test looks, at any speed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::net::SocketAddr;

use serde_json::{json, Value};

#[path = "e2e_server.rs"]
mod e2e_server;

const KEY: &str = "sk-test-tiers";
const MODEL: &str = "smollm2-135m";
/// SmolLM2-135M's KV bytes per token in f32: 2 (K and V) × 30 layers × 3 KV heads × 64 × 4.
const KV_PER_TOKEN: usize = 46_080;
/// The KV budget in tokens: one request of `LONG` tokens fits, not two of them nor one and a
/// `SECOND` one.
const BUDGET_TOKENS: usize = 3_000;
const LONG: u32 = 2_400;
const SECOND: u32 = 2_000;

/// A server whose model holds [`BUDGET_TOKENS`] of KV, waits 1 s for a flex request's
/// admission and sends a keep-alive after 1 s of silence.
fn server() -> SocketAddr {
    tollgate_runtime::dev_model::require_dev_model().expect("dev model");
    std::env::set_var("TOLLGATE_API_KEYS", KEY);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = format!(
        r#"[server]
sse_keep_alive_secs = 1

[models."{MODEL}"]
source = {{ path = "{}" }}
backend = {{ type = "local", device = "cpu", max_queue = 16, max_batch_tokens = 512, kv_cache_dtype = "f32", kv_cache_bytes = {} }}
price = {{ input_per_mtok = "0.05", output_per_mtok = "0.10" }}
flex_max_wait_secs = 1
"#,
        model.display(),
        BUDGET_TOKENS * KV_PER_TOKEN
    );
    let config = tollgate_gateway::config::Config::from_toml_str(&text, &root).unwrap();
    e2e_server::serve(config)
}

/// A chat body at `tier` for `max_tokens`, its end tokens banned.
fn body(tier: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to a million."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {"0": -100, "2": -100},
        "service_tier": tier,
        "stream": stream,
    })
}

/// Sends a chat completion request (the answer's headers once they come).
async fn post(addr: SocketAddr, body: &Value) -> reqwest::Response {
    let url = format!("http://{addr}/v1/chat/completions");
    let request = reqwest::Client::new().post(url).bearer_auth(KEY).json(body);
    request.send().await.unwrap()
}

/// A server-sent event stream read line by line.
struct Lines {
    response: reqwest::Response,
    buffer: String,
}

impl Lines {
    async fn open(addr: SocketAddr, body: &Value) -> Self {
        let response = post(addr, body).await;
        assert_eq!(response.status(), 200);
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next non-empty line; `None` at the end of the stream.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find('\n') {
                let line: String = self.buffer.drain(..=end).collect();
                let line = line.trim_end().to_string();
                if !line.is_empty() {
                    return Some(line);
                }
                continue;
            }
            let chunk = self.response.chunk().await.unwrap()?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Reads until a chunk with generated text, checking each chunk's `service_tier`.
    async fn until_text(&mut self, tier: &str) {
        while let Some(line) = self.next().await {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let chunk: Value = serde_json::from_str(data).unwrap();
            assert_eq!(chunk["service_tier"], tier, "{chunk}");
            if chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                return;
            }
        }
        panic!("the stream ended before any text");
    }
}

#[tokio::test]
async fn flex_not_admitted_within_its_wait_is_refused_with_429_and_retry_after() {
    let addr = server();
    // A default request holds the KV budget; a flex one behind it cannot start.
    let mut long = Lines::open(addr, &body("default", LONG, true)).await;
    long.until_text("default").await;
    for stream in [false, true] {
        let refused = post(addr, &body("flex", SECOND, stream)).await;
        assert_eq!(refused.status(), 429, "stream: {stream}");
        let retry: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry >= 1);
        let error: Value = refused.json().await.unwrap();
        assert_eq!(error["error"]["code"], "resource_unavailable", "{error}");
    }
    // The holder gone, flex gets the engine (the KV is freed within a step of the hang-up).
    drop(long);
    let mut served = None;
    for _ in 0..60 {
        let r = post(addr, &body("flex", 4, false)).await;
        if r.status() == 200 {
            served = Some(r.json::<Value>().await.unwrap());
            break;
        }
        assert_eq!(r.status(), 429);
    }
    let served = served.expect("flex was never served on an idle engine");
    assert_eq!(served["service_tier"], "flex");
    let scraped = reqwest::get(format!("http://{addr}/metrics")).await;
    let metrics = scraped.unwrap().text().await.unwrap();
    for line in [
        r#"tollgate_queue_wait_seconds_count{model="smollm2-135m",service_tier="flex"}"#,
        r#"tollgate_service_tier_time_to_first_token_seconds_count{model="smollm2-135m",service_tier="flex"}"#,
        r#"tollgate_queue_wait_seconds_count{model="smollm2-135m",service_tier="default"}"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}

#[tokio::test]
async fn a_stream_paused_by_priority_gets_keep_alives_and_goes_on() {
    let addr = server();
    let mut paused = Lines::open(addr, &body("default", LONG, true)).await;
    paused.until_text("default").await;
    // Priority needs the KV the default request holds: the default one is paused.
    let mut first = Lines::open(addr, &body("priority", SECOND, true)).await;
    first.until_text("priority").await;
    let mut kept_alive = false;
    while let Some(line) = paused.next().await {
        if line == ": keep-alive" {
            kept_alive = true;
            break;
        }
    }
    assert!(kept_alive, "the paused stream ended without a keep-alive");
    // Priority gone, the paused stream comes back where it stopped.
    drop(first);
    paused.until_text("default").await;
}
