//! `POST /v1/chat/completions` and `POST /v1/completions`, streamed or not.
//!
//! A request fans out to one backend sequence per choice, admitted by
//! [`super::admission::start`]; its outcome is accounted by the [`Completion`] guard that fires
//! exactly once. This file turns the backend events into the OpenAI answer: one JSON body
//! (`collect`) or `chat.completion.chunk` / `text_completion` server-sent events.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::stream::{select_all, StreamExt};
use serde_json::{json, Value};

use crate::api::accounting::Completion;
use crate::api::admission::{start, Started};
use crate::api::openai::{ChatRequest, CompletionRequest, Plan};
use crate::auth::Caller;
use crate::backend::{EventStream, FinishReason, GenerateEvent, LogprobEntry, Usage};
use crate::error::{ApiError, ApiJson};
use crate::{AppState, ModelLabel, RequestId};
use tollgate_metering::kinds::{Endpoint, Outcome};
use tollgate_metering::tags::Tags;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let tags = request.common.tags()?;
    let plan = request.plan(&id.0, state.config.server.max_n)?;
    respond_tagged(state, id, caller, plan, Kind::Chat, tags).await
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let tags = request.common.tags()?;
    let plan = request.plan(&id.0, state.config.server.max_n)?;
    respond_tagged(state, id, caller, plan, Kind::Text, tags).await
}

/// Runs a chat or text completion; its record carries `tags` merged with the key's.
async fn respond_tagged(
    state: AppState,
    id: RequestId,
    caller: Caller,
    plan: Plan,
    kind: Kind,
    tags: Tags,
) -> Result<Response, ApiError> {
    let endpoint = match kind {
        Kind::Chat => Endpoint::ChatCompletions,
        Kind::Text => Endpoint::Completions,
    };
    let Started {
        streams,
        completion,
    } = start(&state, &id, caller, &plan, endpoint, tags).await?;
    let label = ModelLabel(plan.model.clone());
    let mut response = if plan.stream {
        stream_response(streams, plan, kind, id, completion).into_response()
    } else {
        Json(collect(streams, &plan, kind, &id, completion).await?).into_response()
    };
    response.extensions_mut().insert(label);
    Ok(response)
}

/// One choice's full result.
#[derive(Default)]
struct ChoiceResult {
    text: String,
    logprobs: Vec<LogprobEntry>,
    /// Calls by index: id, name, arguments text.
    tool_calls: Vec<(String, String, String)>,
    finish: Option<FinishReason>,
    usage: Usage,
}

impl ChoiceResult {
    /// Adds one streamed part of call `index`.
    fn on_tool_call(&mut self, index: u32, id: Option<String>, name: Option<String>, args: &str) {
        let index = index as usize;
        while self.tool_calls.len() <= index {
            self.tool_calls.push(Default::default());
        }
        let call = &mut self.tool_calls[index];
        if let Some(id) = id {
            call.0 = id;
        }
        if let Some(name) = name {
            call.1 = name;
        }
        call.2.push_str(args);
    }

    /// The assistant message in OpenAI's shape: content is null when the answer is calls only.
    fn message(&self) -> Value {
        if self.tool_calls.is_empty() {
            return json!({"role": "assistant", "content": self.text, "refusal": null});
        }
        let content = if self.text.trim().is_empty() {
            Value::Null
        } else {
            Value::String(self.text.clone())
        };
        let calls: Vec<Value> = self
            .tool_calls
            .iter()
            .map(|(id, name, arguments)| {
                json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
            })
            .collect();
        json!({"role": "assistant", "content": content, "refusal": null, "tool_calls": calls})
    }
}

async fn collect(
    streams: Vec<EventStream>,
    plan: &Plan,
    kind: Kind,
    id: &RequestId,
    mut completion: Completion,
) -> Result<Value, ApiError> {
    let mut results: Vec<ChoiceResult> = (0..streams.len())
        .map(|_| ChoiceResult::default())
        .collect();
    let mut merged = select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |e| (i, e))),
    );
    while let Some((i, event)) = merged.next().await {
        let r = &mut results[i];
        match event {
            Ok(GenerateEvent::Started { prompt_tokens }) => r.usage.prompt_tokens = prompt_tokens,
            Ok(GenerateEvent::Delta {
                text,
                logprobs,
                completion_tokens,
            }) => {
                completion.on_delta(i, completion_tokens);
                r.text.push_str(&text);
                r.logprobs.extend(logprobs);
            }
            Ok(GenerateEvent::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            }) => r.on_tool_call(index, id, name, &arguments),
            Ok(GenerateEvent::Finished { reason, usage }) => {
                r.finish = Some(reason);
                r.usage = usage;
                completion.on_finished(i, reason, usage);
            }
            Err(e) => {
                completion.commit(Outcome::Failed).await;
                return Err(e.into());
            }
        }
    }
    if results.iter().any(|r| r.finish.is_none()) {
        // A backend stream that ends without finishing (its engine went away) is a failure.
        completion.commit(Outcome::Failed).await;
        return Err(ApiError::Internal(
            "the model stopped before finishing".into(),
        ));
    }
    let usage = completion.usage_json();
    completion.commit(Outcome::Completed).await;
    let created = now_secs();
    let choices: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| {
            let finish = r.finish.map(|f| f.as_str());
            match kind {
                Kind::Chat => json!({
                    "index": index,
                    "message": r.message(),
                    "logprobs": plan.logprobs.map(|_| chat_logprobs(&r.logprobs)),
                    "finish_reason": finish,
                }),
                Kind::Text => json!({
                    "index": index,
                    "text": r.text,
                    "logprobs": plan.logprobs.map(|_| legacy_logprobs(&r.logprobs, 0)),
                    "finish_reason": finish,
                }),
            }
        })
        .collect();
    Ok(match kind {
        Kind::Chat => json!({
            "id": format!("chatcmpl-{}", id.0),
            "object": "chat.completion",
            "created": created,
            "model": plan.model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": usage,
        }),
        Kind::Text => json!({
            "id": format!("cmpl-{}", id.0),
            "object": "text_completion",
            "created": created,
            "model": plan.model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": usage,
        }),
    })
}

fn token_json(t: &crate::backend::TokenLogprob) -> Value {
    json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes})
}

/// Chat shape: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`.
fn chat_logprobs(entries: &[LogprobEntry]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = token_json(&e.chosen);
            v["top_logprobs"] = Value::Array(e.top.iter().map(token_json).collect());
            v
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Legacy completions shape: parallel arrays, `top_logprobs` as token→logprob maps.
fn legacy_logprobs(entries: &[LogprobEntry], text_offset: usize) -> Value {
    let mut offset = text_offset;
    let mut offsets = Vec::with_capacity(entries.len());
    for e in entries {
        offsets.push(offset);
        offset += e.chosen.token.len();
    }
    json!({
        "tokens": entries.iter().map(|e| e.chosen.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.chosen.logprob).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| {
            let map: serde_json::Map<String, Value> = e.top.iter().map(|t| (t.token.clone(), json!(t.logprob))).collect();
            Value::Object(map)
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn data(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

fn stream_response(
    streams: Vec<EventStream>,
    plan: Plan,
    kind: Kind,
    id: RequestId,
    mut completion: Completion,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let created = now_secs();
    let (object, prefix) = match kind {
        Kind::Chat => ("chat.completion.chunk", "chatcmpl"),
        Kind::Text => ("text_completion", "cmpl"),
    };
    let response_id = format!("{prefix}-{}", id.0);
    let n_choices = streams.len();
    let body = async_stream::stream! {
        let include_usage = plan.include_usage;
        let usage_null = if include_usage { json!({"usage": null}) } else { json!({}) };
        let chunk = |choice: Value| {
            let mut v = json!({
                "id": response_id, "object": object, "created": created,
                "model": plan.model, "system_fingerprint": null, "choices": [choice],
            });
            if include_usage {
                v["usage"] = usage_null["usage"].clone();
            }
            v
        };
        if kind == Kind::Chat {
            for index in 0..n_choices {
                yield data(&chunk(json!({
                    "index": index, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null,
                })));
            }
        }
        let mut text_offsets = vec![0usize; n_choices];
        let mut finished = vec![false; n_choices];
        let mut merged = select_all(streams.into_iter().enumerate().map(|(i, s)| s.map(move |e| (i, e))));
        while let Some((index, event)) = merged.next().await {
            match event {
                Ok(GenerateEvent::Started { .. }) => {}
                Ok(GenerateEvent::Delta { text, logprobs, completion_tokens }) => {
                    completion.on_delta(index, completion_tokens);
                    if text.is_empty() && logprobs.is_empty() {
                        continue;
                    }
                    let choice = match kind {
                        Kind::Chat => json!({
                            "index": index, "delta": {"content": text},
                            "logprobs": plan.logprobs.map(|_| chat_logprobs(&logprobs)),
                            "finish_reason": null,
                        }),
                        Kind::Text => {
                            let lp = plan.logprobs.map(|_| legacy_logprobs(&logprobs, text_offsets[index]));
                            text_offsets[index] += text.len();
                            json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null})
                        }
                    };
                    yield data(&chunk(choice));
                }
                Ok(GenerateEvent::ToolCallDelta { index: call, id, name, arguments }) => {
                    let mut part = json!({"index": call, "function": {"arguments": arguments}});
                    if let Some(id) = id {
                        part["id"] = json!(id);
                        part["type"] = json!("function");
                    }
                    if let Some(name) = name {
                        part["function"]["name"] = json!(name);
                    }
                    yield data(&chunk(json!({
                        "index": index, "delta": {"tool_calls": [part]},
                        "logprobs": null, "finish_reason": null,
                    })));
                }
                Ok(GenerateEvent::Finished { reason, usage }) => {
                    completion.on_finished(index, reason, usage);
                    finished[index] = true;
                    let choice = match kind {
                        Kind::Chat => json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()}),
                        Kind::Text => json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason.as_str()}),
                    };
                    yield data(&chunk(choice));
                }
                Err(e) => {
                    completion.commit(Outcome::Failed).await;
                    yield data(&ApiError::from(e).body());
                    yield Ok(Event::default().data("[DONE]"));
                    return;
                }
            }
        }
        if finished.iter().any(|f| !f) {
            completion.commit(Outcome::Failed).await;
            yield data(&ApiError::Internal("the model stopped before finishing".into()).body());
            yield Ok(Event::default().data("[DONE]"));
            return;
        }
        completion.commit(Outcome::Completed).await;
        if include_usage {
            yield data(&json!({
                "id": response_id, "object": object, "created": created,
                "model": plan.model, "system_fingerprint": null, "choices": [],
                "usage": completion.usage_json(),
            }));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(body).keep_alive(KeepAlive::default())
}
