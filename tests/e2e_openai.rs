//! End to end with the real model: `tollgate::serve` on an ephemeral port, driven by the
//! `async-openai` crate exactly as an application would use it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::net::SocketAddr;
use std::sync::OnceLock;

use async_openai::config::OpenAIConfig;
use async_openai::types::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageArgs,
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs, FinishReason,
};
use async_openai::Client;
use futures::StreamExt;

#[path = "e2e_server.rs"]
mod e2e_server;

const KEY: &str = "sk-test-rust";
const MODEL: &str = "smollm2-135m";

/// One server for the whole test binary (see [`start_server`]).
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(start_server)
}

/// The server, with the repository's models.toml.
fn start_server() -> SocketAddr {
    tollgate_runtime::dev_model::require_dev_model().expect("dev model");
    std::env::set_var("TOLLGATE_API_KEYS", KEY);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = tollgate_gateway::config::Config::load(&root.join("models.toml")).unwrap();
    e2e_server::serve(config)
}

fn client() -> Client<OpenAIConfig> {
    let addr = server();
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{addr}/v1"))
            .with_api_key(KEY),
    )
}

fn france() -> Vec<ChatCompletionRequestMessage> {
    vec![
        ChatCompletionRequestSystemMessageArgs::default()
            .content("You are a helpful assistant.")
            .build()
            .unwrap()
            .into(),
        ChatCompletionRequestUserMessageArgs::default()
            .content("What is the capital of France?")
            .build()
            .unwrap()
            .into(),
    ]
}

fn user(text: &str) -> Vec<ChatCompletionRequestMessage> {
    vec![ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .unwrap()
        .into()]
}

fn greedy(
    messages: Vec<ChatCompletionRequestMessage>,
    max_tokens: u32,
) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages(messages)
        .temperature(0.0)
        .max_completion_tokens(max_tokens)
        .build()
        .unwrap()
}

#[tokio::test]
async fn greedy_chat_answers_paris_and_stops_at_the_end_token() {
    let r = client().chat().create(greedy(france(), 32)).await.unwrap();
    let choice = &r.choices[0];
    let text = choice.message.content.clone().unwrap();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    let usage = r.usage.unwrap();
    assert!(usage.completion_tokens < 32);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
}

#[tokio::test]
async fn streamed_text_equals_non_streamed_and_ends_with_usage() {
    let c = client();
    let full = c.chat().create(greedy(france(), 24)).await.unwrap();
    let mut req = greedy(france(), 24);
    req.stream = Some(true);
    req.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: true,
    });
    let mut stream = c.chat().create_stream(req).await.unwrap();
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    let mut first_role = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if let Some(u) = chunk.usage {
            assert!(chunk.choices.is_empty());
            usage = Some(u);
        }
        for choice in chunk.choices {
            if first_role.is_none() {
                first_role = Some(choice.delta.role);
            }
            text.push_str(choice.delta.content.as_deref().unwrap_or(""));
            if choice.finish_reason.is_some() {
                finish = choice.finish_reason;
            }
        }
    }
    assert!(
        matches!(first_role, Some(Some(_))),
        "first delta carries the role"
    );
    assert_eq!(Some(text), full.choices[0].message.content);
    assert_eq!(finish, full.choices[0].finish_reason);
    assert_eq!(
        usage.unwrap().completion_tokens,
        full.usage.unwrap().completion_tokens
    );
}

/// Continuous batching must not change results: a greedy answer alone equals the same request
/// answered among eight others, beside a long stream (the end tokens banned) that is still
/// running when they are done, so they are batched whatever the machine's speed.
#[tokio::test]
async fn greedy_output_is_the_same_alone_and_in_a_batch() {
    let c = client();
    let prompt = "Name three colours of the rainbow.";
    let alone = c.chat().create(greedy(user(prompt), 24)).await.unwrap();
    let mut long = greedy(user("Tell me a long story."), 2000);
    long.logit_bias = Some(
        [("0", -100), ("2", -100)]
            .into_iter()
            .map(|(t, b)| (t.to_string(), serde_json::json!(b)))
            .collect(),
    );
    let mut background = c.chat().create_stream(long).await.unwrap();
    // Its first chunk: it runs.
    background.next().await.unwrap().unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        let text = if i == 4 {
            prompt.to_string()
        } else {
            format!("Tell me a fact about the number {i}.")
        };
        tasks.push(tokio::spawn(async move {
            c.chat().create(greedy(user(&text), 24)).await.unwrap()
        }));
    }
    let results: Vec<_> = futures::future::join_all(tasks).await;
    let batched = results[4].as_ref().unwrap();
    assert_eq!(
        batched.choices[0].message.content,
        alone.choices[0].message.content
    );
    // Every chunk the background stream has sent so far: none ends it.
    while let Some(Some(chunk)) = futures::FutureExt::now_or_never(background.next()) {
        let chunk = chunk.unwrap();
        assert!(
            chunk.choices.iter().all(|c| c.finish_reason.is_none()),
            "the background stream ended before the batch"
        );
    }
}

#[tokio::test]
async fn unknown_model_and_bad_key_are_openai_errors() {
    let addr = server();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(
            &serde_json::json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().contains_key("x-request-id"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");

    let r = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth("wrong")
        .json(&serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
}

/// The engine's work shows in `/metrics`, counted exactly: forward passes, prefilled, cached
/// and decoded tokens (a server of its own, so no other test's work is in the counters).
#[tokio::test]
async fn engine_metrics_count_prefill_and_decode() {
    let addr = start_server();
    let own = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{addr}/v1"))
            .with_api_key(KEY),
    );
    // Ready once it lists the model.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while own.models().list().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "server never came up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = own.chat().create(greedy(france(), 8)).await.unwrap();
    let usage = r.usage.unwrap();
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> u64 {
        let prefix = format!("{name}{{model=\"{MODEL}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .parse()
            .unwrap()
    };
    let counters = [
        "tollgate_prefill_tokens_total",
        "tollgate_prefix_cache_hit_tokens_total",
        "tollgate_decode_tokens_total",
        "tollgate_engine_steps_total",
        "tollgate_engine_interleaved_steps_total",
    ]
    .map(value);
    let (prompt, completion) = (
        u64::from(usage.prompt_tokens),
        u64::from(usage.completion_tokens),
    );
    // The first request on a fresh server: the whole prompt prefilled in one pass, nothing
    // from the prefix cache; the first token comes from the prefill pass, each later one from
    // a decode step (a row of the sequence: with speculative decoding one row gives 1 to 9
    // tokens, its own and up to 8 accepted draft tokens); with no other customer's step in
    // flight, none started between layers.
    let [prefilled, cached, decoded, steps, interleaved] = counters;
    assert_eq!((prefilled, cached, interleaved), (prompt, 0, 0), "{text}");
    assert_eq!(
        steps,
        decoded + 1,
        "one prefill step, then one step per row: {text}"
    );
    assert!(
        (completion - 1).div_ceil(9) <= decoded && decoded < completion,
        "{decoded} decode rows for {completion} tokens: {text}"
    );
    assert!(text.contains("tollgate_batch_size{model=\"smollm2-135m\"}"));
}

/// `response_format` with a JSON Schema and a forced tool call through async-openai's types:
/// the content parses against the schema, the call names the tool and its arguments validate.
#[tokio::test]
async fn json_schema_and_tool_calls_through_async_openai() {
    use async_openai::types::{
        ChatCompletionNamedToolChoice, ChatCompletionTool, ChatCompletionToolChoiceOption,
        ChatCompletionToolType, FunctionName, FunctionObject, ResponseFormat,
        ResponseFormatJsonSchema,
    };
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "country": {"enum": ["France", "Italy", "Spain"]},
        },
        "required": ["city", "country"],
        "additionalProperties": false,
    });
    let request = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages(france())
        .temperature(0.0)
        .max_tokens(40u32)
        .response_format(ResponseFormat::JsonSchema {
            json_schema: ResponseFormatJsonSchema {
                name: "place".into(),
                description: None,
                schema: Some(schema),
                strict: Some(true),
            },
        })
        .build()
        .unwrap();
    let response = client().chat().create(request).await.unwrap();
    let content = response.choices[0].message.content.clone().unwrap();
    let value: serde_json::Value = serde_json::from_str(&content).unwrap();
    assert!(value["city"].is_string(), "{content}");
    assert!(["France", "Italy", "Spain"].contains(&value["country"].as_str().unwrap()));

    let tool = ChatCompletionTool {
        r#type: ChatCompletionToolType::Function,
        function: FunctionObject {
            name: "get_weather".into(),
            description: Some("Get the current weather in a city".into()),
            parameters: Some(serde_json::json!({
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
                "additionalProperties": false,
            })),
            strict: None,
        },
    };
    let request = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages(user("What is the weather in Paris?"))
        .temperature(0.0)
        .max_tokens(60u32)
        .tools(vec![tool])
        .tool_choice(ChatCompletionToolChoiceOption::Named(
            ChatCompletionNamedToolChoice {
                r#type: ChatCompletionToolType::Function,
                function: FunctionName {
                    name: "get_weather".into(),
                },
            },
        ))
        .build()
        .unwrap();
    let response = client().chat().create(request).await.unwrap();
    let message = &response.choices[0].message;
    let calls = message.tool_calls.clone().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].function.name, "get_weather");
    assert!(calls[0].id.starts_with("call_"));
    let args: serde_json::Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
    assert!(args["city"].is_string(), "{args}");
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));
}

/// The Responses API through async-openai's own types: a text response, and the same request
/// streamed as typed events whose deltas add up to the same text and whose last event carries
/// the same usage.
#[tokio::test]
async fn responses_api_through_async_openai_types() {
    use async_openai::types::responses::{
        Content, CreateResponseArgs, Input, OutputContent, ResponseEvent, Status,
    };

    let client = client();
    let request = CreateResponseArgs::default()
        .model(MODEL)
        .instructions("You are a helpful assistant.")
        .input(Input::Text("What is the capital of France?".into()))
        .max_output_tokens(24u32)
        .temperature(0.0)
        .store(false)
        .build()
        .unwrap();
    let response = client.responses().create(request.clone()).await.unwrap();
    assert!(response.id.starts_with("resp_"), "{}", response.id);
    assert_eq!(response.object, "response");
    assert_eq!(response.model, MODEL);
    assert!(matches!(
        response.status,
        Status::Completed | Status::Incomplete
    ));
    let text: String = response
        .output
        .iter()
        .filter_map(|o| match o {
            OutputContent::Message(m) => Some(m),
            _ => None,
        })
        .flat_map(|m| &m.content)
        .filter_map(|c| match c {
            Content::OutputText(t) => Some(t.text.as_str()),
            Content::Refusal(_) => None,
        })
        .collect();
    assert!(text.contains("Paris"), "{text}");
    let usage = response.usage.clone().unwrap();
    assert!(usage.input_tokens > 5 && usage.output_tokens > 0);
    assert_eq!(usage.total_tokens, usage.input_tokens + usage.output_tokens);

    let mut events = client.responses().create_stream(request).await.unwrap();
    let mut kinds = Vec::new();
    let mut streamed = String::new();
    let mut last_usage = None;
    let mut sequence = Vec::new();
    // Like OpenAI's, the stream has no `[DONE]`: it ends with its last event (async-openai
    // 0.30 then reports the closed connection as an error, so a client stops at that event).
    while let Some(event) = events.next().await {
        if matches!(kinds.last(), Some(&"completed" | &"incomplete")) {
            break;
        }
        let event = event.unwrap();
        match &event {
            ResponseEvent::ResponseCreated(e) => {
                kinds.push("created");
                sequence.push(e.sequence_number);
            }
            ResponseEvent::ResponseOutputTextDelta(e) => {
                kinds.push("delta");
                sequence.push(e.sequence_number);
                streamed.push_str(&e.delta);
            }
            ResponseEvent::ResponseCompleted(e) => {
                kinds.push("completed");
                sequence.push(e.sequence_number);
                last_usage = e.response.usage.clone();
            }
            ResponseEvent::ResponseIncomplete(e) => {
                kinds.push("incomplete");
                sequence.push(e.sequence_number);
                last_usage = e.response.usage.clone();
            }
            _ => kinds.push("other"),
        }
    }
    assert_eq!(kinds.first(), Some(&"created"));
    assert!(matches!(kinds.last(), Some(&"completed" | &"incomplete")));
    assert!(sequence.windows(2).all(|w| w[0] < w[1]), "{sequence:?}");
    assert_eq!(
        streamed, text,
        "greedy: the stream says what the response said"
    );
    let last_usage = last_usage.unwrap();
    assert_eq!(
        (last_usage.input_tokens, last_usage.output_tokens),
        (usage.input_tokens, usage.output_tokens)
    );
}
