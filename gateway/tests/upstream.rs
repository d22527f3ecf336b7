//! The gateway in front of OpenAI-compatible upstreams over real sockets: failover before the
//! first token, usage taken from the upstream, mid-stream failures as error events, upstream
//! refusals passed through.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_gateway::auth::AuthConfig;
use tollgate_gateway::backend::upstream::{Discovery, UpstreamPool};
use tollgate_gateway::backend::{Backend, ModelInfo};
use tollgate_gateway::config::Config;
use tollgate_gateway::AppState;
use tollgate_testkit::{Behaviour, FakeUpstream, Reply};

const KEY: &str = "k";

/// A streamed "Hello world" with the usage the upstream reports.
fn good() -> Behaviour {
    Behaviour::Answers(Reply::pieces(["Hello", " world"]).with_counted_usage(5))
}

/// Three content chunks, then this `usage` object (JSON text), or none when empty.
fn reports(usage: &str) -> Behaviour {
    let usage = (!usage.is_empty()).then(|| serde_json::from_str(usage).unwrap());
    Behaviour::Answers(
        Reply::pieces(["Hel", "lo", " world"])
            .without_role_chunk()
            .with_usage(usage),
    )
}

/// Three chunks of three words each, and no `usage`.
fn words() -> Behaviour {
    Behaviour::Answers(
        Reply::pieces(["one two three", " four five six", " seven eight nine"])
            .without_role_chunk(),
    )
}

/// A fake upstream that refuses any request not streamed with usage (the gateway always asks
/// for both): its base URL and its count of chat requests.
async fn upstream(behaviour: Behaviour) -> (String, Arc<AtomicU64>) {
    let up = FakeUpstream::new(behaviour)
        .requiring_stream()
        .spawn()
        .await
        .unwrap();
    (up.v1_url(), up.hit_counter())
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
    let (good, good_hits) = upstream(good()).await;
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
                   "prompt_tokens_details": {"cached_tokens": 0},
                   "completion_tokens_details": {"accepted_prediction_tokens": 0,
                                                 "rejected_prediction_tokens": 0}})
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
        let (url, _) = upstream(reports(usage)).await;
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
        let (url, _) = upstream(reports(usage)).await;
        let addr = gateway_counting(vec![url], Discovery::Static, Some(Arc::new(Words))).await;
        let got: Value = ask(addr, false).await.json().await.unwrap();
        assert_eq!(
            got["usage"]["completion_tokens"], completion,
            "usage {usage}: {got}"
        );
    }
    // Chunks of several words: the tokenizer's count, above the chunk count.
    let (url, _) = upstream(words()).await;
    let addr = gateway_counting(vec![url], Discovery::Static, Some(Arc::new(Words))).await;
    let got: Value = ask(addr, false).await.json().await.unwrap();
    assert_eq!(got["usage"]["completion_tokens"], 9, "{got}");
    // Without a tokenizer the same stream is three chunks.
    let (url, _) = upstream(words()).await;
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
    let (good, good_hits) = upstream(good()).await;
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
    let (good, hits) = upstream(good()).await;
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

/// Members that are all busy (429 or 503) make the request a 503 with `Retry-After` (come back
/// soon); one member that is broken (another 5xx) among them makes it unavailable without
/// one. Busy is read from the status, not the error's text.
#[tokio::test]
async fn busy_members_ask_the_client_to_retry_and_broken_ones_do_not() {
    let (busy_a, _) = upstream(Behaviour::Status(429)).await;
    let (busy_b, _) = upstream(Behaviour::Status(503)).await;
    let r = ask(gateway(vec![busy_a.clone(), busy_b]).await, false).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");

    let (broken, _) = upstream(Behaviour::Status(500)).await;
    let r = ask(gateway(vec![busy_a, broken]).await, false).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");
}

/// A flex request that no member had capacity for (each answered 429 `resource_unavailable`,
/// as a `tollgate worker` does past `flex_max_wait_secs`) is the same 429 for the client, with
/// the longest `Retry-After` a member asked for; one member merely busy among them makes it
/// the usual 503.
#[tokio::test]
async fn members_without_capacity_for_flex_make_a_429_resource_unavailable() {
    let (none_a, _) = upstream(Behaviour::NoCapacity).await;
    let (none_b, _) = upstream(Behaviour::NoCapacity).await;
    let r = ask(gateway(vec![none_a.clone(), none_b]).await, false).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7", "{:?}", r.headers());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "resource_unavailable", "{body}");

    let (busy, _) = upstream(Behaviour::Status(503)).await;
    let r = ask(gateway(vec![none_a, busy]).await, false).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
}
