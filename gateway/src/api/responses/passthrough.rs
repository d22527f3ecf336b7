//! `/v1/responses` for models whose upstream speaks the Responses API
//! (`backend.responses = "passthrough"`): the request goes to the upstream's own endpoint as
//! the client sent it, and its events come back as the upstream sent them, so what the
//! upstream supports beyond Tollgate's translation reaches the client.
//!
//! Tollgate keeps what it owns: admission, limits and the budget (through the same
//! [`Completion`] guard as every billed request, one usage record per response, billed from the
//! upstream's `usage` and never below what streamed by), the customer's stored responses and
//! conversations (`previous_response_id` is resolved here, scoped to the customer, and sent as
//! input items; the upstream is asked to store nothing), and the response's identity: its
//! `id`, `model`, `store` and `previous_response_id` are the client's.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::request::{input_items, CreateResponse, Item};
use super::ToStore;
use crate::api::accounting::Completion;
use crate::api::admission::{resolve_tier, start_passthrough};
use crate::auth::Caller;
use crate::backend::{Backend, PassthroughEvent, PassthroughStream};
use crate::error::ApiError;
use crate::{AppState, ModelLabel, RequestId};
use tollgate_metering::kinds::{Endpoint, Outcome, ResponseEnd, ServiceTier};
use tollgate_metering::store::now_micros;

/// What the client's response says of itself, whatever the upstream said.
struct Identity {
    id: String,
    model: String,
    store: bool,
    previous_response_id: Option<String>,
}

impl Identity {
    /// Rewrites the response object an event carries.
    fn apply(&self, data: &mut Value) {
        if let Some(r) = data.get_mut("response").filter(|r| r.is_object()) {
            r["id"] = json!(self.id);
            r["model"] = json!(self.model);
            r["store"] = json!(self.store);
            r["previous_response_id"] = json!(self.previous_response_id);
        }
    }
}

/// A stored conversation item as a Responses API input item.
fn as_input(item: &Item) -> Value {
    match item {
        Item::Message { role, text } => json!({"type": "message", "role": role, "content": text}),
        Item::FunctionCall {
            call_id,
            name,
            arguments,
        } => {
            json!({"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments})
        }
        Item::FunctionCallOutput { call_id, output } => {
            json!({"type": "function_call_output", "call_id": call_id, "output": output})
        }
    }
}

/// The upstream's request: the client's, with the conversation so far in `input`, nothing
/// stored upstream, and no previous response id (the upstream never saw it).
fn upstream_body(raw: &Value, history: &[Item]) -> Value {
    let mut body: Map<String, Value> = raw.as_object().cloned().unwrap_or_default();
    body.remove("previous_response_id");
    body.insert("store".into(), json!(false));
    if !history.is_empty() {
        let mut input: Vec<Value> = history.iter().map(as_input).collect();
        match raw.get("input") {
            Some(Value::String(text)) => input.push(json!({"role": "user", "content": text})),
            Some(Value::Array(items)) => input.extend(items.iter().cloned()),
            _ => {}
        }
        body.insert("input".into(), Value::Array(input));
    }
    Value::Object(body)
}

/// An upper bound of the prompt's tokens without the upstream's tokenizer: the bytes of what
/// it will read (each token of a byte-level BPE covers at least one byte).
fn prompt_bound(body: &Value) -> u32 {
    let bytes: usize = ["instructions", "input", "tools", "text"]
        .iter()
        .map(|k| body.get(*k).map_or(0, |v| v.to_string().len()))
        .sum();
    u32::try_from(bytes + 16).unwrap_or(u32::MAX)
}

/// Runs the request on the upstream.
#[expect(
    clippy::too_many_arguments,
    reason = "the request's parts, each needed once; a struct would only rename them"
)]
pub(super) async fn create(
    state: AppState,
    id: RequestId,
    caller: Caller,
    backend: Arc<dyn Backend>,
    body: &CreateResponse,
    raw: &Value,
    history: Vec<Item>,
    store: bool,
    tags: tollgate_metering::tags::Tags,
) -> Result<Response, ApiError> {
    if body.background == Some(true) {
        return Err(ApiError::InvalidRequest {
            message: "background responses are not supported - 'background'".into(),
            param: Some("background".into()),
        });
    }
    let service_tier = resolve_tier(&state, &caller, &body.model, body.service_tier)?;
    let mut upstream = upstream_body(raw, &history);
    // The tier resolved here (never `auto`), or none for `default`.
    if let Some(b) = upstream.as_object_mut() {
        b.remove("service_tier");
        if service_tier != ServiceTier::Default {
            b.insert("service_tier".into(), serde_json::json!(service_tier));
        }
    }
    let prompt = prompt_bound(&upstream);
    let context = backend.info().context_length;
    let max_output = body
        .max_output_tokens
        .unwrap_or_else(|| context.saturating_sub(prompt.min(context)));
    let stream_requested = body.stream.unwrap_or(false);
    let customer_id = caller.customer_id.clone();
    let completion = start_passthrough(
        &state,
        &id,
        caller,
        &body.model,
        stream_requested,
        prompt,
        max_output,
        Endpoint::Responses,
        tags,
        service_tier,
    )
    .await?;
    let events = backend
        .start_responses(upstream, prompt)
        .map_err(ApiError::from)?;
    let identity = Identity {
        id: format!("resp_{}", id.0.replace('-', "")),
        model: body.model.clone(),
        store,
        previous_response_id: body.previous_response_id.clone(),
    };
    // The conversation to keep: what came before and this request's input (when its items are
    // ones Tollgate can continue from).
    let keep = store.then(|| {
        let mut conversation = history;
        match input_items(body.input.as_ref()) {
            Ok(items) => conversation.extend(items),
            Err(_) => tracing::warn!(
                response_id = %identity.id,
                "input items beyond text and function calls are not kept for continuation"
            ),
        }
        ToStore {
            customer_id,
            conversation,
            retention: state.config.server.response_retention,
        }
    });
    let label = ModelLabel(body.model.clone());
    let relay = Relay {
        state,
        identity,
        completion,
        keep,
    };
    let mut response = if stream_requested {
        relay.streamed(events).into_response()
    } else {
        Json(relay.collected(events).await?).into_response()
    };
    response.extensions_mut().insert(label);
    Ok(response)
}

/// One response being relayed and accounted.
struct Relay {
    state: AppState,
    identity: Identity,
    completion: Completion,
    keep: Option<ToStore>,
}

impl Relay {
    /// Accounts one event and rewrites it for the client; how the response ended when it was
    /// the last.
    async fn step(&mut self, event: &mut PassthroughEvent) -> Option<ResponseEnd> {
        self.completion.on_delta(0, event.output_tokens);
        self.identity.apply(&mut event.data);
        let (Some(usage), Some(end)) = (event.usage, ResponseEnd::of_event(&event.kind)) else {
            return None;
        };
        self.completion.on_finished(0, end.finish_reason(), usage);
        // What the client reads is what is billed.
        if let Some(r) = event.data.get_mut("response").filter(|r| r.is_object()) {
            let (input, output) = (
                self.completion.prompt_tokens(),
                self.completion.completion_tokens(),
            );
            let cached = self.completion.cached_tokens().min(input);
            let mut u = r["usage"].as_object().cloned().unwrap_or_default();
            u.insert("input_tokens".into(), json!(input));
            u.insert(
                "input_tokens_details".into(),
                json!({"cached_tokens": cached}),
            );
            u.insert("output_tokens".into(), json!(output));
            u.insert("total_tokens".into(), json!(input + output));
            r["usage"] = Value::Object(u);
        }
        let outcome = end.outcome();
        self.completion.commit(outcome).await;
        if outcome == Outcome::Completed {
            self.store(&event.data["response"]).await;
        }
        Some(end)
    }

    async fn store(&mut self, response: &Value) {
        let (Some(keep), Some(db)) = (self.keep.take(), &self.state.store) else {
            return;
        };
        let now = now_micros();
        let expires = now + i64::try_from(keep.retention.as_micros()).unwrap_or(i64::MAX / 2);
        if let Err(e) = db
            .put_response(
                &self.identity.id,
                &keep.customer_id,
                now,
                expires,
                &keep.conversation,
                response,
            )
            .await
        {
            tracing::error!(response_id = %self.identity.id, error = %e, "cannot store the response");
        }
    }

    async fn collected(mut self, mut events: PassthroughStream) -> Result<Value, ApiError> {
        while let Some(event) = events.next().await {
            let mut event = match event {
                Ok(e) => e,
                Err(e) => {
                    self.completion.commit(Outcome::Failed).await;
                    return Err(e.into());
                }
            };
            if let Some(end) = self.step(&mut event).await {
                if end == ResponseEnd::Failed {
                    return Err(ApiError::Internal(format!(
                        "the upstream's response failed: {}",
                        event.data["response"]["error"]
                    )));
                }
                return Ok(event.data["response"].take());
            }
        }
        self.completion.commit(Outcome::Failed).await;
        Err(ApiError::Internal(
            "the upstream stopped before the response ended".into(),
        ))
    }

    fn streamed(
        mut self,
        mut events: PassthroughStream,
    ) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
        let keep_alive = self.state.config.server.keep_alive();
        let body = async_stream::stream! {
            while let Some(event) = events.next().await {
                let mut event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        self.completion.commit(Outcome::Failed).await;
                        let error = ApiError::from(e).body();
                        yield Ok(Event::default().event("error").data(serde_json::to_string(&error).unwrap_or_default()));
                        return;
                    }
                };
                let last = self.step(&mut event).await.is_some();
                yield Ok(Event::default().event(event.kind.clone()).data(event.data.to_string()));
                if last {
                    return;
                }
            }
            self.completion.commit(Outcome::Failed).await;
            let error = ApiError::Internal("the upstream stopped before the response ended".into()).body();
            yield Ok(Event::default().event("error").data(serde_json::to_string(&error).unwrap_or_default()));
        };
        Sse::new(body).keep_alive(keep_alive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_gets_the_conversation_and_stores_nothing() {
        let raw = json!({"model": "m", "input": "and then?", "previous_response_id": "resp_1",
                         "store": true, "reasoning": {"effort": "low"}});
        let history = vec![
            Item::Message {
                role: "user".into(),
                text: "hi".into(),
            },
            Item::Message {
                role: "assistant".into(),
                text: "hello".into(),
            },
        ];
        let body = upstream_body(&raw, &history);
        assert_eq!(body["store"], false);
        assert!(body.get("previous_response_id").is_none());
        // Fields Tollgate does not translate go as they came.
        assert_eq!(body["reasoning"]["effort"], "low");
        let input = body["input"].as_array().unwrap();
        assert_eq!(input.len(), 3);
        assert_eq!(input[1]["role"], "assistant");
        assert_eq!(input[2], json!({"role": "user", "content": "and then?"}));
        // Without history the input is untouched.
        assert_eq!(upstream_body(&raw, &[])["input"], "and then?");
        assert!(usize::try_from(prompt_bound(&body)).unwrap() >= "hihelloand then?".len());
    }
}
