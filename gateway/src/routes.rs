//! The OpenAI endpoints: chat completions and completions (streamed or not), models, health
//! and metrics.
//!
//! A request fans out to one backend sequence per choice. Its outcome is accounted by a
//! [`Completion`] guard that fires exactly once, whether the answer completed, failed, or the
//! client went away (dropping the response drops the backend streams, which cancels them).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::stream::{select_all, StreamExt};
use serde_json::{json, Value};

use crate::backend::{Backend, EventStream, FinishReason, GenerateEvent, LogprobEntry, Usage};
use crate::error::{ApiError, ApiJson};
use crate::openai::{ChatRequest, CompletionRequest, Plan};
use crate::{AppState, ModelLabel, RequestId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Accounts one request exactly once: on completion, failure or disconnect.
struct Completion {
    state: AppState,
    model: String,
    request_id: String,
    started: Instant,
    first_token: Option<Instant>,
    /// Prompt tokens per distinct prompt, counted once.
    prompt_tokens: u32,
    completion_tokens: u32,
    outcome: &'static str,
}

impl Completion {
    fn new(state: &AppState, model: &str, request_id: &str) -> Self {
        Self {
            state: state.clone(),
            model: model.to_string(),
            request_id: request_id.to_string(),
            started: Instant::now(),
            first_token: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            outcome: "cancelled",
        }
    }

    fn finish(&mut self, outcome: &'static str) {
        self.outcome = outcome;
    }

    fn on_text(&mut self) {
        self.first_token.get_or_insert_with(Instant::now);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let m = &self.state.metrics;
        let model = [self.model.as_str()];
        m.input_tokens
            .with_label_values(&model)
            .inc_by(f64::from(self.prompt_tokens));
        m.output_tokens
            .with_label_values(&model)
            .inc_by(f64::from(self.completion_tokens));
        if let Some(first) = self.first_token {
            m.time_to_first_token
                .with_label_values(&model)
                .observe((first - self.started).as_secs_f64());
            if self.completion_tokens > 1 {
                let per = first.elapsed().as_secs_f64() / f64::from(self.completion_tokens - 1);
                m.time_per_output_token
                    .with_label_values(&model)
                    .observe(per);
            }
        }
        tracing::info!(
            request_id = %self.request_id,
            model = %self.model,
            outcome = self.outcome,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            ttft_ms = self.first_token.map(|f| (f - self.started).as_millis() as u64),
            duration_ms = self.started.elapsed().as_millis() as u64,
            "completion finished"
        );
    }
}

fn backend_for(state: &AppState, model: &str) -> Result<Arc<dyn Backend>, ApiError> {
    state
        .backends
        .get(model)
        .cloned()
        .ok_or_else(|| ApiError::ModelNotFound(model.to_string()))
}

/// Starts every choice's sequence; any failure cancels the ones already started.
async fn start(backend: &Arc<dyn Backend>, plan: &Plan) -> Result<Vec<EventStream>, ApiError> {
    let mut streams = Vec::with_capacity(plan.choices.len());
    for request in &plan.choices {
        streams.push(backend.generate(request.clone()).await?);
    }
    Ok(streams)
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let plan = request.plan(&id.0, state.config.server.max_n)?;
    respond(state, id, plan, Kind::Chat).await
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let plan = request.plan(&id.0, state.config.server.max_n)?;
    respond(state, id, plan, Kind::Text).await
}

async fn respond(
    state: AppState,
    id: RequestId,
    plan: Plan,
    kind: Kind,
) -> Result<Response, ApiError> {
    let backend = backend_for(&state, &plan.model)?;
    let streams = start(&backend, &plan).await?;
    let completion = Completion::new(&state, &plan.model, &id.0);
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
    finish: Option<FinishReason>,
    usage: Usage,
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
            Ok(GenerateEvent::Delta { text, logprobs }) => {
                completion.on_text();
                r.text.push_str(&text);
                r.logprobs.extend(logprobs);
            }
            Ok(GenerateEvent::Finished { reason, usage }) => {
                r.finish = Some(reason);
                r.usage = usage;
                completion.completion_tokens += usage.completion_tokens;
            }
            Err(e) => {
                completion.finish("failed");
                return Err(e.into());
            }
        }
    }
    let n = plan.n as usize;
    let prompt_tokens: u32 = results
        .iter()
        .step_by(n.max(1))
        .map(|r| r.usage.prompt_tokens)
        .sum();
    completion.prompt_tokens = prompt_tokens;
    completion.finish("completed");
    let completion_tokens = completion.completion_tokens;
    let created = now_secs();
    let choices: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| {
            let finish = r.finish.map(|f| f.as_str());
            match kind {
                Kind::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": r.text, "refusal": null},
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
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
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
        let mut prompt_tokens = vec![0u32; n_choices];
        let mut text_offsets = vec![0usize; n_choices];
        let mut merged = select_all(streams.into_iter().enumerate().map(|(i, s)| s.map(move |e| (i, e))));
        while let Some((index, event)) = merged.next().await {
            match event {
                Ok(GenerateEvent::Started { prompt_tokens: p }) => prompt_tokens[index] = p,
                Ok(GenerateEvent::Delta { text, logprobs }) => {
                    completion.on_text();
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
                Ok(GenerateEvent::Finished { reason, usage }) => {
                    completion.completion_tokens += usage.completion_tokens;
                    let choice = match kind {
                        Kind::Chat => json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()}),
                        Kind::Text => json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason.as_str()}),
                    };
                    yield data(&chunk(choice));
                }
                Err(e) => {
                    completion.finish("failed");
                    yield data(&ApiError::from(e).body());
                    yield Ok(Event::default().data("[DONE]"));
                    return;
                }
            }
        }
        let n = plan.n as usize;
        completion.prompt_tokens = prompt_tokens.iter().step_by(n.max(1)).sum();
        completion.finish("completed");
        if include_usage {
            let p = completion.prompt_tokens;
            let c = completion.completion_tokens;
            yield data(&json!({
                "id": response_id, "object": object, "created": created,
                "model": plan.model, "system_fingerprint": null, "choices": [],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            }));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(body).keep_alive(KeepAlive::default())
}

fn model_json(info: &crate::backend::ModelInfo) -> Value {
    json!({"id": info.id, "object": "model", "created": info.created, "owned_by": info.owned_by})
}

pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let mut models: Vec<_> = state.backends.values().map(|b| b.info()).collect();
    models.sort_by(|a, b| a.id.cmp(&b.id));
    Json(json!({"object": "list", "data": models.iter().map(model_json).collect::<Vec<_>>()}))
}

pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let backend = backend_for(&state, &id)?;
    Ok(Json(model_json(&backend.info())))
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(&state.backends),
    )
        .into_response()
}
