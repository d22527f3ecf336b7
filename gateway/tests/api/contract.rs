//! Shapes and errors: what a client of the OpenAI API sees.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::scripted::*;

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
