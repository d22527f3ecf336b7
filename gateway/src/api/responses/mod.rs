//! The OpenAI Responses API: `POST /v1/responses` (streamed or not), `GET` and `DELETE
//! /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`.
//!
//! A response runs as the chat request its input translates to (`request`), through the same
//! admission, backends and [`crate::api::accounting::Completion`] accounting as chat completions: one
//! usage record per response (`endpoint = "/v1/responses"`), the same exactness and
//! cancellation rules. Its output and events come from one fold (`output`); with `store` (the
//! default when the server has a database) the response and the conversation it answered are
//! kept for the customer (`tollgate_metering::requests::responses`), so `previous_response_id` can
//! continue it.
//!
//! Models whose upstream speaks the Responses API (`backend.responses = "passthrough"`) are
//! served by `passthrough` instead: the request goes to the upstream as sent, billed and stored
//! the same way.
//!
//! Modules: `request` (bodies, items, translation), `wire` (the answers' types), `output`
//! (the fold that builds the response object and its events), `passthrough` (upstreams with
//! their own Responses API).

pub(crate) mod background;
mod output;
mod passthrough;
pub(crate) mod request;
mod wire;

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use serde_json::{json, Value};

use self::output::{Builder, Echo, Status};
use self::request::{in_response_terms, CreateResponse, Item};
use self::wire::{
    DeletedResponse, InputContent, InputItem, ItemStatus, ResponseItemList, StreamEvent,
    ToolChoiceEcho,
};
use crate::api::accounting::Completion;
use crate::api::admission::{start, Started};
use crate::api::completions::now_secs;
use crate::api::openai::Plan;
use crate::auth::Caller;
use crate::backend::{EventStream, FinishReason, GenerateEvent, ToolChoice};
use crate::error::{ApiError, ApiPath};
use crate::{AppState, ModelLabel, RequestId};
use tollgate_metering::kinds::{Endpoint, Outcome};
use tollgate_metering::store::now_micros;

/// What a finished response leaves to store.
struct ToStore {
    customer_id: String,
    conversation: Vec<Item>,
    retention: Duration,
}

/// Creates a model response (`stream: true`: typed `response.*` events).
#[utoipa::path(post, operation_id = "create_response", path = "/v1/responses", tag = "public",
    request_body = request::CreateResponse,
    responses(
        (status = 200, description = "The response, or its event stream",
         content((wire::Response = "application/json"), (crate::openapi::ServerSentEvent = "text/event-stream"))),
        crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    Extension(caller): Extension<Caller>,
    crate::error::ApiJsonValue(body, raw): crate::error::ApiJsonValue<CreateResponse>,
) -> Result<Response, ApiError> {
    if body.background == Some(true) {
        return background::accept(state, id, caller, body, &raw).await;
    }
    let store = store_flag(&state, &body)?;
    let history = history(&state, &body, &caller).await?;
    let tags = tags_of(&body)?;
    let backend = crate::api::admission::backend_for(&state, &caller.customer_id, &body.model)?;
    if backend.passes_responses_through() {
        return passthrough::create(
            state, id, caller, backend, &body, &raw, history, store, tags,
        )
        .await;
    }
    let (plan, input) = body.plan(&history, &id.0, state.config.server.max_n)?;
    let mut echo = echo(&body, &plan, &id, store);
    let customer_id = caller.customer_id.clone();
    let Started {
        mut streams,
        completion,
        service_tier,
    } = start(&state, &id, caller, &plan, Endpoint::Responses, tags)
        .await
        .map_err(in_response_terms)?;
    echo.service_tier = service_tier;
    let stream = streams
        .pop()
        .ok_or_else(|| ApiError::Internal("no backend stream".into()))?;
    let mut conversation = history;
    conversation.extend(input);
    let keep = store.then(|| ToStore {
        customer_id,
        conversation,
        retention: state.config.server.response_retention,
    });
    let label = ModelLabel(plan.model.clone());
    let mut response = if plan.stream {
        streamed(state, stream, Builder::new(echo), completion, keep).into_response()
    } else {
        Json(collected(state, stream, Builder::new(echo), completion, keep).await?).into_response()
    };
    response.extensions_mut().insert(label);
    Ok(response)
}

/// Whether to store the response: as asked, by default when the server has a database.
fn store_flag(state: &AppState, body: &CreateResponse) -> Result<bool, ApiError> {
    match (body.store, &state.store) {
        (Some(true), None) => Err(ApiError::InvalidRequest {
            message: "store is not available: this server runs without a database - 'store'".into(),
            param: Some("store".into()),
        }),
        (requested, Some(_)) => Ok(requested.unwrap_or(true)),
        (_, None) => Ok(false),
    }
}

/// The conversation `previous_response_id` continues (empty without one): its input and its
/// output.
async fn history(
    state: &AppState,
    body: &CreateResponse,
    caller: &Caller,
) -> Result<Vec<Item>, ApiError> {
    let Some(previous) = &body.previous_response_id else {
        return Ok(Vec::new());
    };
    let not_found = || ApiError::InvalidRequest {
        message: format!(
            "Previous response with id '{previous}' not found. - 'previous_response_id'"
        ),
        param: Some("previous_response_id".into()),
    };
    let Some(db) = &state.store else {
        return Err(not_found());
    };
    let stored = db
        .get_response::<Item>(previous, &caller.customer_id, now_micros())
        .await?
        .ok_or_else(not_found)?;
    let mut history = stored.input_items;
    history.extend(output_items(&stored.response));
    Ok(history)
}

/// What the response echoes of its request and plan.
fn echo(body: &CreateResponse, plan: &Plan, id: &RequestId, store: bool) -> Echo {
    let tools = plan.choices.first().and_then(|c| c.tools.clone());
    Echo {
        id: format!("resp_{}", id.0.replace('-', "")),
        created_at: now_secs(),
        model: plan.model.clone(),
        instructions: body.instructions.clone(),
        max_output_tokens: body.max_output_tokens,
        temperature: body.temperature.unwrap_or(1.0),
        top_p: body.top_p.unwrap_or(1.0),
        tools: body.tools.clone().unwrap_or_default(),
        tool_choice: match tools.as_ref().map(|t| &t.choice) {
            None | Some(ToolChoice::Auto) => ToolChoiceEcho::Mode("auto".into()),
            Some(ToolChoice::None) => ToolChoiceEcho::Mode("none".into()),
            Some(ToolChoice::Required) => ToolChoiceEcho::Mode("required".into()),
            Some(ToolChoice::Function(name)) => ToolChoiceEcho::Function {
                kind: "function".into(),
                name: name.clone(),
            },
        },
        parallel_tool_calls: body.parallel_tool_calls.unwrap_or(true),
        text_format: body
            .text
            .as_ref()
            .and_then(|t| t.format.clone())
            .unwrap_or_else(|| json!({"type": "text"})),
        previous_response_id: body.previous_response_id.clone(),
        store,
        metadata: body.metadata.clone().unwrap_or_default(),
        user: body.user.clone(),
        service_tier: crate::backend::ServiceTier::Default,
        background: body.background == Some(true),
    }
}

/// Cost-allocation tags, as for chat completions: `metadata` pairs and `user`.
pub(crate) fn tags_of(body: &CreateResponse) -> Result<tollgate_metering::tags::Tags, ApiError> {
    let metadata: tollgate_metering::tags::Tags = body
        .metadata
        .iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
        .collect();
    tollgate_metering::tags::from_request(Some(&metadata), body.user.as_deref()).map_err(|e| {
        ApiError::InvalidRequest {
            message: e.message,
            param: Some(e.param),
        }
    })
}

/// The conversation items a stored response's output adds.
fn output_items(response: &Value) -> Vec<Item> {
    let mut items = Vec::new();
    for o in response["output"].as_array().into_iter().flatten() {
        match o["type"].as_str() {
            Some("message") => items.push(Item::Message {
                role: "assistant".into(),
                text: o["content"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["text"].as_str())
                    .collect(),
            }),
            Some("function_call") => items.push(Item::FunctionCall {
                call_id: o["call_id"].as_str().unwrap_or_default().into(),
                name: o["name"].as_str().unwrap_or_default().into(),
                arguments: o["arguments"].as_str().unwrap_or_default().into(),
            }),
            _ => {}
        }
    }
    items
}

/// Feeds one backend event to the fold and the accounting; `Some(status)` once it ends.
fn step(
    event: Result<GenerateEvent, crate::backend::BackendError>,
    builder: &mut Builder,
    completion: &mut Completion,
    events: &mut Vec<StreamEvent>,
) -> Option<Status> {
    match event {
        Ok(GenerateEvent::Started { .. }) => {
            completion.on_started();
            None
        }
        Ok(GenerateEvent::Delta {
            text,
            completion_tokens,
            ..
        }) => {
            completion.on_delta(0, completion_tokens);
            events.extend(builder.on_text(&text));
            None
        }
        Ok(GenerateEvent::ToolCallDelta {
            index,
            id,
            name,
            arguments,
        }) => {
            events.extend(builder.on_call(index, id, name, &arguments));
            None
        }
        Ok(GenerateEvent::Finished { reason, usage }) => {
            completion.on_finished(0, reason, usage);
            Some(match reason {
                FinishReason::Length => Status::Incomplete,
                _ => Status::Completed,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "response failed");
            Some(Status::Failed(
                "the model failed while generating this response".into(),
            ))
        }
    }
}

/// Stores a finished response (a database error is logged: the client has its answer).
async fn keep(state: &AppState, id: &str, keep: Option<ToStore>, builder: &Builder) {
    let (Some(keep), Some(db)) = (keep, &state.store) else {
        return;
    };
    // The conversation up to this response's input; its output is in the response object and
    // is appended when a continuation reads it back (`output_items`).
    let conversation = keep.conversation;
    let response = match serde_json::to_value(builder.response()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(response_id = id, error = %e, "cannot encode the response to store it");
            return;
        }
    };
    let now = now_micros();
    let expires = now + i64::try_from(keep.retention.as_micros()).unwrap_or(i64::MAX / 2);
    if let Err(e) = db
        .put_response(
            id,
            &keep.customer_id,
            now,
            expires,
            &conversation,
            &response,
        )
        .await
    {
        tracing::error!(response_id = id, error = %e, "cannot store the response");
    }
}

/// The end of a response: its status (a stream that ended without finishing failed), the
/// usage it reports, and its usage record written through the accounting guard.
async fn settle(
    status: Option<Status>,
    completion: &mut Completion,
) -> (Status, crate::backend::Usage) {
    let status =
        status.unwrap_or_else(|| Status::Failed("the model stopped before finishing".into()));
    let outcome = if matches!(status, Status::Failed(_)) {
        Outcome::Failed
    } else {
        Outcome::Completed
    };
    let usage = crate::backend::Usage {
        prompt_tokens: completion.prompt_tokens(),
        completion_tokens: completion.completion_tokens(),
        cached_tokens: completion.cached_tokens(),
        ..Default::default()
    };
    completion.commit(outcome).await;
    (status, usage)
}

async fn collected(
    state: AppState,
    mut stream: EventStream,
    mut builder: Builder,
    mut completion: Completion,
    to_store: Option<ToStore>,
) -> Result<wire::Response, ApiError> {
    let mut events = Vec::new();
    let mut status = None;
    while let Some(event) = stream.next().await {
        if let Some(s) = step(event, &mut builder, &mut completion, &mut events) {
            status = Some(s);
            break;
        }
    }
    let (status, usage) = settle(status, &mut completion).await;
    if let Status::Failed(message) = &status {
        return Err(ApiError::Internal(message.clone()));
    }
    builder.finish(status, Some(usage));
    let id = builder.id().to_string();
    keep(&state, &id, to_store, &builder).await;
    Ok(builder.response())
}

fn sse(event: StreamEvent) -> Result<Event, Infallible> {
    let data = serde_json::to_string(&event).unwrap_or_default();
    Ok(Event::default().event(event.kind).data(data))
}

fn streamed(
    state: AppState,
    mut stream: EventStream,
    mut builder: Builder,
    mut completion: Completion,
    to_store: Option<ToStore>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let keep_alive = state.config.server.keep_alive();
    let body = async_stream::stream! {
        for e in builder.start() {
            yield sse(e);
        }
        let mut status = None;
        while let Some(event) = stream.next().await {
            let mut events = Vec::new();
            let end = step(event, &mut builder, &mut completion, &mut events);
            for e in events {
                yield sse(e);
            }
            if end.is_some() {
                status = end;
                break;
            }
        }
        let (status, usage) = settle(status, &mut completion).await;
        for e in builder.finish(status, Some(usage)) {
            yield sse(e);
        }
        let id = builder.id().to_string();
        keep(&state, &id, to_store, &builder).await;
    };
    Sse::new(body).keep_alive(keep_alive)
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("Response with id '{id}' not found."))
}

fn database(state: &AppState, id: &str) -> Result<tollgate_metering::store::Store, ApiError> {
    state.store.clone().ok_or_else(|| not_found(id))
}

/// A stored response of the caller's customer (a background one as it is now), or with
/// `stream=true` the events of a background response.
#[utoipa::path(get, operation_id = "get_response", path = "/v1/responses/{id}", tag = "public",
    params(
        ("id" = String, Path, description = "The response id (`resp_...`)"),
        ("stream" = Option<bool>, Query, description = "Stream the events of a background response, following it until it ends"),
        ("starting_after" = Option<i64>, Query, minimum = 0, description = "With `stream`: the events after this `sequence_number` only"),
    ),
    responses(
        (status = 200, description = "The response, or its event stream",
         content((wire::Response = "application/json"), (crate::openapi::ServerSentEvent = "text/event-stream"))),
        crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let flag = |name: &'static str, value: Option<&String>| match value.map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::invalid(
            format!("{name} must be true or false, not {other} - '{name}'"),
            name,
        )),
    };
    if flag("stream", query.get("stream"))? {
        let after = match query.get("starting_after") {
            None => None,
            Some(n) => Some(n.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::invalid(
                    format!("starting_after must be a sequence number, not {n} - 'starting_after'"),
                    "starting_after",
                )
            })?),
        };
        return background::stream(&state, &caller, id, after).await;
    }
    let stored = database(&state, &id)?
        .get_response::<Item>(&id, &caller.customer_id, now_micros())
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(stored.response).into_response())
}

/// Deletes a stored response of the caller's customer.
#[utoipa::path(delete, operation_id = "delete_response", path = "/v1/responses/{id}", tag = "public",
    params(("id" = String, Path, description = "The response id (`resp_...`)")),
    responses((status = 200, body = wire::DeletedResponse), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeletedResponse>, ApiError> {
    if !database(&state, &id)?
        .delete_response(&id, &caller.customer_id)
        .await?
    {
        return Err(not_found(&id));
    }
    Ok(Json(DeletedResponse {
        id,
        object: "response",
        deleted: true,
    }))
}

/// An input item in the API's shape, with an id derived from its response and position.
fn input_item(response_id: &str, index: usize, item: &Item) -> InputItem {
    let short = response_id.trim_start_matches("resp_");
    let status = ItemStatus::Completed;
    match item {
        Item::Message { role, text } => InputItem::Message {
            id: format!("msg_{short}i{index:04}"),
            role: role.clone(),
            status,
            content: vec![InputContent {
                kind: if role == "assistant" {
                    "output_text"
                } else {
                    "input_text"
                },
                text: text.clone(),
            }],
        },
        Item::FunctionCall {
            call_id,
            name,
            arguments,
        } => InputItem::FunctionCall {
            id: format!("fc_{short}i{index:04}"),
            call_id: call_id.clone(),
            name: name.clone(),
            arguments: arguments.clone(),
            status,
        },
        Item::FunctionCallOutput { call_id, output } => InputItem::FunctionCallOutput {
            id: format!("fco_{short}i{index:04}"),
            call_id: call_id.clone(),
            output: output.clone(),
            status,
        },
    }
}

/// The input items of a stored response, newest first unless `order=asc`.
#[utoipa::path(get, path = "/v1/responses/{id}/input_items", tag = "public",
    params(
        ("id" = String, Path, description = "The response id (`resp_...`)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100),
        ("order" = Option<String>, Query, pattern = "^(asc|desc)$"),
        ("after" = Option<String>, Query, description = "An item id: list the items after it"),
    ),
    responses((status = 200, body = wire::ResponseItemList), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn input_items(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ResponseItemList>, ApiError> {
    let stored = database(&state, &id)?
        .get_response::<Item>(&id, &caller.customer_id, now_micros())
        .await?
        .ok_or_else(|| not_found(&id))?;
    let limit = match query.get("limit") {
        None => 20,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                return Err(ApiError::InvalidRequest {
                    message: format!("limit must be between 1 and 100, not {l} - 'limit'"),
                    param: Some("limit".into()),
                })
            }
        },
    };
    let mut items: Vec<InputItem> = stored
        .input_items
        .iter()
        .enumerate()
        .map(|(i, item)| input_item(&id, i, item))
        .collect();
    match query.get("order").map(String::as_str) {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(other) => {
            return Err(ApiError::InvalidRequest {
                message: format!("order must be asc or desc, not {other} - 'order'"),
                param: Some("order".into()),
            })
        }
    }
    if let Some(after) = query.get("after") {
        let at = items
            .iter()
            .position(|i| i.id() == after)
            .map_or(items.len(), |p| p + 1);
        items.drain(..at);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    Ok(Json(ResponseItemList {
        object: "list",
        first_id: items.first().map(|i| i.id().to_string()),
        last_id: items.last().map(|i| i.id().to_string()),
        data: items,
        has_more,
    }))
}
