//! One chat or text completion over an upstream: the request body it is sent as (tools,
//! response_format, logprobs passed through), and the reading of its SSE chunks into the
//! gateway's events, counting what streams by and settling the upstream's `usage` against
//! that count. Retrying on another member is [`super::failover`]'s.

use std::sync::Arc;

use futures::StreamExt;
use serde_json::{json, Value};

use super::chunk::{self, Chunk};
use super::failover::{failover, Credentials, Read};
use super::sse;
use super::Member;
use crate::backend::{
    ChatMessage, EventStream, FinishReason, GenerateEvent, GenerateRequest, Prompt, ResponseFormat,
    SamplingParams, ServiceTier, TokenCounter, ToolChoice, ToolsRequest, Usage, UsageSource,
};

/// An upper bound of the prompt's tokens without the upstream's tokenizer: every token of a
/// byte-level BPE covers at least one byte, plus a few template tokens per message.
pub(super) fn prompt_bound(prompt: &Prompt) -> u32 {
    let n = match prompt {
        Prompt::Chat(messages) => {
            messages
                .iter()
                .map(|m| m.content.len() + m.role.len() + 8)
                .sum::<usize>()
                + 8
        }
        Prompt::Text(text) => text.len() + 2,
    };
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One message in OpenAI's shape.
fn message_json(m: &ChatMessage) -> Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        v["tool_calls"] = json!(m
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect::<Vec<_>>());
        if m.content.is_empty() {
            v["content"] = Value::Null;
        }
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    v
}

/// The OpenAI request body for one sequence; with `send_tier`, its `service_tier` unless that
/// is `default` (what an upstream serves when not told), as one of OpenAI's tiers: a
/// reservation's request asks for `priority`, a batch line for `flex` (OpenAI's chat API has
/// no `batch`; flex is its tier for work that can wait).
pub(super) fn request_body(
    model: &str,
    request: &GenerateRequest,
    send_tier: bool,
) -> (String, Value) {
    let p = &request.params;
    let mut body = json!({
        "model": model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": p.temperature,
        "top_p": p.top_p,
    });
    let path = match &request.prompt {
        Prompt::Chat(messages) => {
            body["messages"] = json!(messages.iter().map(message_json).collect::<Vec<_>>());
            if let Some(t) = &request.tools {
                tool_fields(&mut body, t);
            }
            if let Some(k) = p.logprobs {
                body["logprobs"] = json!(true);
                body["top_logprobs"] = json!(k);
            }
            if let Some(text) = &request.prediction {
                body["prediction"] = json!({"type": "content", "content": text});
            }
            "/v1/chat/completions"
        }
        Prompt::Text(text) => {
            body["prompt"] = json!(text);
            if let Some(k) = p.logprobs {
                body["logprobs"] = json!(k);
            }
            "/v1/completions"
        }
    };
    if let Some(format) = response_format_json(&request.response_format) {
        body["response_format"] = format;
    }
    if send_tier && request.service_tier != ServiceTier::Default {
        let tier = match request.service_tier {
            ServiceTier::Reserved => ServiceTier::Priority,
            ServiceTier::Batch => ServiceTier::Flex,
            tier => tier,
        };
        body["service_tier"] = json!(tier);
    }
    sampling_fields(&mut body, p);
    (path.to_string(), body)
}

/// `tools`, `tool_choice` and `parallel_tool_calls`.
fn tool_fields(body: &mut Value, t: &ToolsRequest) {
    body["tools"] = json!(t
        .tools
        .iter()
        .map(|d| {
            let mut f = json!({"name": d.name, "parameters": d.parameters});
            if let Some(desc) = &d.description {
                f["description"] = json!(desc);
            }
            if let Some(strict) = d.strict {
                f["strict"] = json!(strict);
            }
            json!({"type": "function", "function": f})
        })
        .collect::<Vec<_>>());
    body["tool_choice"] = match &t.choice {
        ToolChoice::None => json!("none"),
        ToolChoice::Auto => json!("auto"),
        ToolChoice::Required => json!("required"),
        ToolChoice::Function(name) => {
            json!({"type": "function", "function": {"name": name}})
        }
    };
    body["parallel_tool_calls"] = json!(t.parallel);
}

/// `response_format`, unless it is plain text.
fn response_format_json(format: &ResponseFormat) -> Option<Value> {
    match format {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(json!({"type": "json_object"})),
        ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        } => Some(json!({
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": strict},
        })),
    }
}

/// The sampling settings that differ from OpenAI's defaults.
fn sampling_fields(body: &mut Value, p: &SamplingParams) {
    if let Some(m) = p.max_tokens {
        body["max_tokens"] = json!(m);
    }
    if let Some(s) = p.seed {
        body["seed"] = json!(s);
    }
    if !p.stop.is_empty() {
        body["stop"] = json!(p.stop);
    }
    if p.frequency_penalty != 0.0 {
        body["frequency_penalty"] = json!(p.frequency_penalty);
    }
    if p.presence_penalty != 0.0 {
        body["presence_penalty"] = json!(p.presence_penalty);
    }
    if p.top_k > 0 {
        body["top_k"] = json!(p.top_k);
    }
    if p.repetition_penalty != 1.0 {
        body["repetition_penalty"] = json!(p.repetition_penalty);
    }
    if !p.logit_bias.is_empty() {
        let bias: serde_json::Map<String, Value> = p
            .logit_bias
            .iter()
            .map(|(t, b)| (t.to_string(), json!(b)))
            .collect();
        body["logit_bias"] = Value::Object(bias);
    }
}

fn finish_reason(text: &str) -> FinishReason {
    match text {
        "length" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    }
}

/// An upstream's `usage` (chat's `prompt_tokens`/`completion_tokens`, or the Responses API's
/// `input_tokens`/`output_tokens`), as far as it can be read: a figure that is missing or not
/// a count is `None`, for the gateway's own count to stand in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub(super) struct UpstreamUsage {
    #[serde(default, alias = "input_tokens", deserialize_with = "count")]
    prompt_tokens: Option<u32>,
    #[serde(default, alias = "output_tokens", deserialize_with = "count")]
    completion_tokens: Option<u32>,
    #[serde(default, alias = "input_tokens_details", deserialize_with = "lenient")]
    prompt_tokens_details: CachedDetails,
    #[serde(default, deserialize_with = "lenient")]
    completion_tokens_details: PredictionDetails,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
struct CachedDetails {
    #[serde(default, deserialize_with = "count")]
    cached_tokens: Option<u32>,
}

/// The prediction's tokens an upstream (a worker, or OpenAI) reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
struct PredictionDetails {
    #[serde(default, deserialize_with = "count")]
    accepted_prediction_tokens: Option<u32>,
    #[serde(default, deserialize_with = "count")]
    rejected_prediction_tokens: Option<u32>,
}

/// A token count, or `None` for anything else (`null`, a string, a negative number).
fn count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = <Value as serde::Deserialize>::deserialize(d)?;
    Ok(v.as_u64().map(|n| u32::try_from(n).unwrap_or(u32::MAX)))
}

/// `T`, or its default when the value is not one.
fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    let v = <Value as serde::Deserialize>::deserialize(d)?;
    Ok(serde_json::from_value(v).unwrap_or_default())
}

impl UpstreamUsage {
    /// A `usage` object as the upstream sent it; `None` when it is not an object.
    pub(super) fn read(v: &Value) -> Option<Self> {
        v.is_object()
            .then(|| serde_json::from_value(v.clone()).ok())
            .flatten()
    }
}

/// A finished sequence's usage from the upstream's `usage` (if it sent one), never below what
/// the gateway observed: an output figure that is missing, not a number, or smaller than the
/// output tokens seen streaming by (`observed`: counted with the model's tokenizer, or one
/// per chunk) is replaced by that count, and the usage says so ([`UsageSource::Observed`]). A
/// missing prompt figure is the gateway's upper bound of the prompt.
pub(super) fn settled_usage(
    usage: Option<UpstreamUsage>,
    prompt_estimate: u32,
    observed: u32,
) -> Usage {
    let Some(u) = usage else {
        return Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: observed,
            source: UsageSource::Observed,
            ..Usage::default()
        };
    };
    let prompt_tokens = u.prompt_tokens.unwrap_or(prompt_estimate);
    let (completion_tokens, source) = match u.completion_tokens {
        Some(n) if n >= observed => (n, UsageSource::Upstream),
        _ => (observed, UsageSource::Observed),
    };
    let cached_tokens = u
        .prompt_tokens_details
        .cached_tokens
        .unwrap_or(0)
        .min(prompt_tokens);
    let d = u.completion_tokens_details;
    Usage {
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        source,
        service_tier: None,
        accepted_prediction_tokens: d.accepted_prediction_tokens.unwrap_or(0),
        rejected_prediction_tokens: d.rejected_prediction_tokens.unwrap_or(0),
    }
}

/// Tokens one chunk of output adds: counted with the tokenizer, at least one.
pub(super) fn tokens_of(counter: Option<&dyn TokenCounter>, text: &str) -> u32 {
    match counter {
        Some(c) if !text.is_empty() => c.count(text).max(1),
        _ => 1,
    }
}

/// What a chat or text completion's stream has shown so far, fed one chunk at a time.
struct ChunkFold {
    prompt_estimate: u32,
    /// Whether output reached the client.
    started: bool,
    /// Output tokens seen streaming by (see `tokens_of`).
    observed: u32,
    finish: Option<FinishReason>,
    usage: Option<UpstreamUsage>,
    /// The tier the upstream says it served at (its chunks' `service_tier`, the last one
    /// read), when it is one Tollgate knows.
    service_tier: Option<ServiceTier>,
}

impl ChunkFold {
    fn new(prompt_estimate: u32) -> Self {
        Self {
            prompt_estimate,
            started: false,
            observed: 0,
            finish: None,
            usage: None,
            service_tier: None,
        }
    }

    /// The events one chunk adds.
    fn on_chunk(&mut self, chunk: Chunk<'_>, count: &dyn Fn(&str) -> u32) -> Vec<GenerateEvent> {
        let mut events = Vec::new();
        // Started once the upstream produced something (a role-only first chunk does
        // not count: until text arrives the request can still move elsewhere).
        let choice = chunk.choice;
        let text = choice.as_ref().map_or("", |c| &c.text);
        let finished_here = choice.as_ref().is_some_and(|c| c.finish_reason.is_some());
        let has_calls = choice.as_ref().is_some_and(|c| !c.calls.is_empty());
        if !self.started && (!text.is_empty() || finished_here || has_calls) {
            self.started = true;
            events.push(GenerateEvent::Started {
                prompt_tokens: self.prompt_estimate,
            });
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        if let Some(tier) = chunk.service_tier {
            self.service_tier = Some(tier);
        }
        let Some(choice) = choice else {
            return events;
        };
        let calls = &choice.calls;
        if !choice.text.is_empty() || !choice.logprobs.is_empty() || !calls.is_empty() {
            let arguments: String = calls
                .iter()
                .filter_map(|c| c["function"]["arguments"].as_str())
                .collect();
            let added = if arguments.is_empty() {
                count(&choice.text)
            } else {
                count(&format!("{}{arguments}", choice.text))
            };
            self.observed = self.observed.saturating_add(added);
            events.push(GenerateEvent::Delta {
                text: choice.text.into_owned(),
                logprobs: choice.logprobs,
                completion_tokens: self.observed,
            });
        }
        for call in calls {
            events.push(GenerateEvent::ToolCallDelta {
                index: call["index"]
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .unwrap_or(0),
                id: call["id"].as_str().map(str::to_string),
                name: call["function"]["name"].as_str().map(str::to_string),
                arguments: call["function"]["arguments"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            });
        }
        if let Some(f) = &choice.finish_reason {
            self.finish = Some(finish_reason(f));
        }
        events
    }

    /// The end of the stream (`failure` if reading it broke; a stream without a finish reason
    /// failed too): the finish with the settled usage unless it failed, then the end.
    fn end(self, failure: Option<String>, base: &str) -> Vec<Read<GenerateEvent>> {
        let failure = match (failure, self.finish) {
            (None, None) => Some(format!("{base}: the stream ended without a finish reason")),
            (failure, _) => failure,
        };
        let mut reads = Vec::new();
        if failure.is_none() {
            let usage = Usage {
                service_tier: self.service_tier,
                ..settled_usage(self.usage, self.prompt_estimate, self.observed)
            };
            reads.push(Read::Event(GenerateEvent::Finished {
                reason: self.finish.unwrap_or(FinishReason::Stop),
                usage,
            }));
        }
        reads.push(Read::End {
            started: self.started,
            failure,
        });
        reads
    }
}

/// Streams one sequence from the best member, retrying on others until the first event.
#[allow(
    clippy::too_many_arguments,
    reason = "what the stream's task takes over, each moved into it; a struct would exist for this call only"
)]
pub(super) fn run(
    client: reqwest::Client,
    candidates: Vec<Arc<Member>>,
    credentials: Credentials,
    path: String,
    body: Value,
    prompt_estimate: u32,
    parent: tracing::Span,
    counter: Option<Arc<dyn TokenCounter>>,
) -> EventStream {
    // One client span per attempt.
    let call_span = move |member: &Member| {
        crate::server::telemetry::span(|| {
            tracing::info_span!(
                parent: &parent,
                "upstream.call",
                otel.name = "upstream call",
                otel.kind = "client",
                server.address = %member.base,
                http.response.status_code = tracing::field::Empty,
            )
        })
    };
    let read = move |member: &Member, response: reqwest::Response| {
        let counter = counter.clone();
        let base = member.base.clone();
        async_stream::stream! {
            let count = |text: &str| tokens_of(counter.as_deref(), text);
            let mut body = response.bytes_stream();
            let mut events = sse::Decoder::default();
            let mut fold = ChunkFold::new(prompt_estimate);
            let mut failure = None;
            loop {
                let data = match events.next_data() {
                    Some(Ok(data)) => data,
                    Some(Err(e)) => {
                        failure = Some(format!("{base}: stream broken: {e}"));
                        break;
                    }
                    None => match body.next().await {
                        Some(Ok(bytes)) => {
                            events.feed(&bytes);
                            continue;
                        }
                        Some(Err(e)) => {
                            failure = Some(format!("{base}: stream broken: {e}"));
                            break;
                        }
                        None => break,
                    },
                };
                if data.trim() == "[DONE]" {
                    break;
                }
                let Some(mut chunk) = chunk::parse(&data) else {
                    failure = Some(format!("{base}: unreadable event `{data}`"));
                    break;
                };
                if let Some(message) = chunk.error.take() {
                    failure = Some(format!("{base}: {message}"));
                    break;
                }
                for e in fold.on_chunk(chunk, &count) {
                    yield Read::Event(e);
                }
            }
            for r in fold.end(failure, &base) {
                yield r;
            }
        }
    };
    Box::pin(failover(
        client,
        candidates,
        credentials,
        path,
        body,
        "token",
        call_span,
        read,
    ))
}

#[cfg(test)]
mod tests;
