//! `POST /v1/chat/completions` and `POST /v1/completions`, streamed or not.
//!
//! A request fans out to one backend sequence per choice, admitted by
//! [`super::admission::start`]; its outcome is accounted by the [`Completion`] guard that fires
//! exactly once. The events go through one fold (`fold`) whether the answer is one JSON body
//! (`collect`) or `chat.completion.chunk` / `text_completion` server-sent events; `shapes` has
//! the typed answers.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

mod fold;
mod shapes;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::stream::StreamExt;

use crate::api::accounting::Completion;
use crate::api::admission::{start, Started};
use crate::api::openai::{
    ChatCompletionChoice, ChatRequest, CompletionChoice, CompletionRequest,
    CreateChatCompletionResponse, CreateCompletionResponse, Plan,
};
use crate::auth::Caller;
use crate::backend::EventStream;
use crate::error::{ApiError, ApiJson};
use crate::{AppState, ModelLabel, RequestId};
use fold::{merged, ChoiceResult, Fold, Step};
use shapes::{ChatChunkChoice, Chunk, Delta, FunctionPart, ToolCallPart};
use tollgate_metering::kinds::{Endpoint, ServiceTier};
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

/// Creates a chat completion (`stream: true`: `chat.completion.chunk` server-sent events
/// ending with `data: [DONE]`).
#[utoipa::path(post, path = "/v1/chat/completions", tag = "public",
    request_body = crate::api::openai::ChatRequest,
    responses(
        (status = 200, description = "The completion, or its event stream",
         content((crate::api::openai::CreateChatCompletionResponse = "application/json"), (crate::openapi::ServerSentEvent = "text/event-stream"))),
        crate::openapi::PublicErrors),
    security(("api_key" = [])))]
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

/// Creates a (legacy) text completion.
#[utoipa::path(post, path = "/v1/completions", tag = "public",
    request_body = crate::api::openai::CompletionRequest,
    responses(
        (status = 200, description = "The completion, or its event stream",
         content((crate::api::openai::CreateCompletionResponse = "application/json"), (crate::openapi::ServerSentEvent = "text/event-stream"))),
        crate::openapi::PublicErrors),
    security(("api_key" = [])))]
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
        service_tier,
    } = start(&state, &id, caller, &plan, endpoint, tags).await?;
    let label = ModelLabel(plan.model.clone());
    let mut response = if plan.stream {
        let keep_alive = state.config.server.keep_alive();
        stream_response(
            streams,
            plan,
            kind,
            id,
            (completion, service_tier),
            keep_alive,
        )
        .into_response()
    } else {
        collect(streams, &plan, kind, &id, completion).await?
    };
    response.extensions_mut().insert(label);
    Ok(response)
}

/// The non-streamed answer: one body once every choice finished.
async fn collect(
    streams: Vec<EventStream>,
    plan: &Plan,
    kind: Kind,
    id: &RequestId,
    completion: Completion,
) -> Result<Response, ApiError> {
    let mut fold = Fold::new(completion, streams.len(), true);
    let mut events = std::pin::pin!(merged(streams));
    while let Some((index, event)) = events.next().await {
        fold.apply(index, event).await?;
    }
    fold.end().await?;
    let usage = fold.usage();
    let service_tier = fold.service_tier();
    let (created, results) = (now_secs(), fold.into_choices());
    let finish = |r: &ChoiceResult| r.finish;
    Ok(match kind {
        Kind::Chat => Json(CreateChatCompletionResponse {
            id: format!("chatcmpl-{}", id.0),
            object: "chat.completion".into(),
            created,
            model: plan.model.clone(),
            system_fingerprint: None,
            service_tier,
            choices: (0..)
                .zip(&results)
                .map(|(index, r)| ChatCompletionChoice {
                    index,
                    message: shapes::message(r),
                    logprobs: plan.logprobs.map(|_| shapes::chat_logprobs(&r.logprobs)),
                    finish_reason: finish(r),
                })
                .collect(),
            usage,
        })
        .into_response(),
        Kind::Text => Json(CreateCompletionResponse {
            id: format!("cmpl-{}", id.0),
            object: "text_completion".into(),
            created,
            model: plan.model.clone(),
            system_fingerprint: None,
            service_tier,
            choices: (0..)
                .zip(&results)
                .map(|(index, r)| CompletionChoice {
                    index,
                    text: r.text.clone(),
                    logprobs: plan
                        .logprobs
                        .map(|_| shapes::legacy_logprobs(&r.logprobs, 0)),
                    finish_reason: finish(r),
                })
                .collect(),
            usage,
        })
        .into_response(),
    })
}

fn data(v: &impl serde::Serialize) -> Result<Event, Infallible> {
    Ok(Event::default().json_data(v).unwrap_or_else(|e| {
        Event::default().data(format!(
            "{{\"error\": {{\"message\": \"cannot encode a chunk: {e}\"}}}}"
        ))
    }))
}

fn stream_response(
    streams: Vec<EventStream>,
    plan: Plan,
    kind: Kind,
    id: RequestId,
    (completion, service_tier): (Completion, ServiceTier),
    keep_alive: KeepAlive,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let created = now_secs();
    let (object, prefix) = match kind {
        Kind::Chat => ("chat.completion.chunk", "chatcmpl"),
        Kind::Text => ("text_completion", "cmpl"),
    };
    let response_id = format!("{prefix}-{}", id.0);
    let n_choices = streams.len();
    let body = async_stream::stream! {
        let usage_null = plan.include_usage.then_some(None);
        let chunk = |choice| Chunk {
            id: &response_id, object, created, model: &plan.model,
            system_fingerprint: None, service_tier, choices: vec![choice], usage: usage_null,
        };
        let chat = |index, delta, logprobs, finish_reason| ChunkChoice::Chat(ChatChunkChoice {
            index, delta, logprobs, finish_reason,
        });
        if kind == Kind::Chat {
            for index in 0..n_choices {
                let delta = Delta { role: Some("assistant"), content: Some(String::new()), ..Delta::default() };
                yield data(&chunk(chat(index, delta, None, None)));
            }
        }
        let mut text_offsets = vec![0usize; n_choices];
        let mut fold = Fold::new(completion, n_choices, false);
        let mut events = std::pin::pin!(merged(streams));
        while let Some((index, event)) = events.next().await {
            let choice = match fold.apply(index, event).await {
                Ok(Step::Quiet) => continue,
                Ok(Step::Text { text, logprobs }) => match kind {
                    Kind::Chat => {
                        let lp = plan.logprobs.map(|_| shapes::chat_logprobs(&logprobs));
                        chat(index, Delta { content: Some(text), ..Delta::default() }, lp, None)
                    }
                    Kind::Text => {
                        let lp = plan.logprobs.map(|_| shapes::legacy_logprobs(&logprobs, text_offsets[index]));
                        text_offsets[index] += text.len();
                        ChunkChoice::Text(CompletionChoice { index: choice_index(index), text, logprobs: lp, finish_reason: None })
                    }
                },
                Ok(Step::ToolCall { call, id, name, arguments }) => {
                    let part = ToolCallPart {
                        index: call,
                        kind: id.is_some().then_some("function"),
                        id,
                        function: FunctionPart { name, arguments },
                    };
                    chat(index, Delta { tool_calls: Some(vec![part]), ..Delta::default() }, None, None)
                }
                Ok(Step::Finished(reason)) => match kind {
                    Kind::Chat => chat(index, Delta::default(), None, Some(reason)),
                    Kind::Text => ChunkChoice::Text(CompletionChoice {
                        index: choice_index(index), text: String::new(), logprobs: None, finish_reason: Some(reason),
                    }),
                },
                Err(e) => {
                    yield data(&e.body());
                    yield Ok(Event::default().data("[DONE]"));
                    return;
                }
            };
            yield data(&chunk(choice));
        }
        if let Err(e) = fold.end().await {
            yield data(&e.body());
            yield Ok(Event::default().data("[DONE]"));
            return;
        }
        if plan.include_usage {
            yield data(&Chunk::<ChunkChoice> {
                id: &response_id, object, created, model: &plan.model,
                system_fingerprint: None, service_tier: fold.service_tier(), choices: vec![],
                usage: Some(Some(fold.usage())),
            });
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(body).keep_alive(keep_alive)
}

/// A choice's index as the legacy completion shape types it (`n` is capped far below).
fn choice_index(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

/// A chunk's choice: chat or legacy text.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum ChunkChoice {
    Chat(ChatChunkChoice),
    Text(CompletionChoice),
}
