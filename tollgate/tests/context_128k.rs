//! A model whose GGUF declares Llama 3.1's 128k-token context, served with a KV budget that
//! holds far fewer tokens: the server serves the context that fits, and a request beyond it is
//! refused over HTTP with 400 and the `param` at fault, never admitted or crashed.
//!
//! The model is built here (Llama-shaped, random weights, a byte vocabulary, so one byte of
//! prompt is one token) and served by `tollgate::serve` on an ephemeral port.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::time::Duration;

use tollgate_runtime::synth::{byte_vocab, gguf_bytes, GgmlDType, LlamaShape};

const KEY: &str = "sk-test-128k";
const MODEL: &str = "llama-128k";
/// KV bytes per token of the model: 2 (K and V) × 2 layers × 1 KV head × 16 dims × 4 bytes.
const KV_PER_TOKEN: usize = 256;
/// The context the budget holds.
const SERVED: usize = 1024;

fn write_model(dir: &std::path::Path) {
    let shape = LlamaShape {
        vocab: 260,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 1,
        ffn: 128,
        context: 131_072,
        rope_theta: 500_000.0,
        tied: true,
    };
    let mut metadata = shape.metadata();
    metadata.extend(byte_vocab(
        &[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|eot_id|>",
            "<|eom_id|>",
        ],
        0,
        1,
        "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    ));
    let bytes = gguf_bytes(&metadata, &shape.tensors(GgmlDType::Q8_0)).unwrap();
    std::fs::write(dir.join("model.gguf"), bytes).unwrap();
    std::fs::write(
        dir.join("models.toml"),
        format!(
            r#"[models."{MODEL}"]
source = {{ path = "model.gguf" }}
backend = {{ type = "local", device = "cpu", weights = "auto", max_queue = 8, max_batch_tokens = 512, kv_cache_bytes = {} }}
price = {{ input_per_mtok = "0.05", output_per_mtok = "0.10" }}
"#,
            SERVED * KV_PER_TOKEN
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_served_context_is_a_400_naming_the_param() {
    let dir = std::env::temp_dir().join(format!("tollgate-128k-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_model(&dir);
    std::env::set_var("TOLLGATE_API_KEYS", KEY);
    let config = tollgate_gateway::config::Config::load(&dir.join("models.toml")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tollgate::serve(
        listener,
        config,
        tollgate::Metering::default(),
        async move {
            stopped.await.ok();
        },
    ));
    let http = reqwest::Client::new();
    // The port answers 503 while the model loads.
    let mut models = serde_json::Value::Null;
    for _ in 0..600 {
        if let Ok(r) = http
            .get(format!("http://{addr}/v1/models"))
            .bearer_auth(KEY)
            .send()
            .await
        {
            if r.status() == 200 {
                models = r.json().await.unwrap();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(models["data"][0]["id"], MODEL, "{models}");

    let chat = |content: String, max_tokens: usize| {
        let http = http.clone();
        async move {
            let r = http
                .post(format!("http://{addr}/v1/chat/completions"))
                .bearer_auth(KEY)
                .json(&serde_json::json!({
                    "model": MODEL,
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    // Within the served context: answered.
    let (status, body) = chat("a".repeat(SERVED / 2), 4).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], SERVED / 2, "{body}");
    // A prompt longer than the served context (but far inside the declared 128k).
    let (status, body) = chat("a".repeat(SERVED + 10), 4).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "messages", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&SERVED.to_string()), "{message}");
    // A prompt that fits, with max_tokens that would run past the context.
    let (status, body) = chat("a".repeat(SERVED / 2), SERVED).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "max_tokens", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");

    stop.send(()).ok();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .ok();
    std::fs::remove_dir_all(&dir).ok();
}
