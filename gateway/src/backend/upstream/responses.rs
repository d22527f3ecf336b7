//! `/v1/responses` passed through to an upstream that speaks the Responses API itself
//! (`backend.responses = "passthrough"`): its typed events are relayed as they come, the
//! output deltas counted as they stream by, and the last event's `usage` settled against that
//! count (never below it), the same rules as for chat streams.
//!
//! Like chat streams (the same [`super::failover`]), a request that fails before its first event
//! is retried on another member; after it, a failure ends the stream with an error.

use std::sync::Arc;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;

use super::chat::{settled_usage, tokens_of, UpstreamUsage};
use super::failover::{failover, Credentials, Read};
use super::Member;
use crate::backend::{PassthroughEvent, PassthroughStream, TokenCounter, Usage};

/// The events that end a response.
pub(crate) fn is_terminal(kind: &str) -> bool {
    tollgate_metering::kinds::ResponseEnd::of_event(kind).is_some()
}

/// The usage to bill from a Responses API `usage` object (`input_tokens`, `output_tokens`,
/// `input_tokens_details.cached_tokens`), never below `observed` output tokens.
fn settled(usage: Option<&Value>, prompt_estimate: u32, observed: u32) -> Usage {
    settled_usage(
        usage.and_then(UpstreamUsage::read),
        prompt_estimate,
        observed,
    )
}

/// Streams one response from the best member, retrying on others until the first event.
pub(super) fn run(
    client: reqwest::Client,
    candidates: Vec<Arc<Member>>,
    credentials: Credentials,
    body: Value,
    prompt_estimate: u32,
    counter: Option<Arc<dyn TokenCounter>>,
) -> PassthroughStream {
    let read = move |member: &Member, response: reqwest::Response| {
        let counter = counter.clone();
        let base = member.base.clone();
        async_stream::stream! {
            let mut events = response.bytes_stream().eventsource();
            let mut started = false;
            let mut observed = 0u32;
            let mut failure = None;
            let mut ended = false;
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        failure = Some(format!("{base}: stream broken: {e}"));
                        break;
                    }
                };
                if event.data.trim() == "[DONE]" {
                    break;
                }
                let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
                    failure = Some(format!("{base}: unreadable event `{}`", event.data));
                    break;
                };
                let kind = data["type"].as_str().map_or_else(|| event.event.clone(), str::to_string);
                if kind == "error" {
                    let message = data["message"].as_str().or_else(|| data["error"]["message"].as_str());
                    failure = Some(format!("{base}: {}", message.unwrap_or("error event")));
                    break;
                }
                if matches!(
                    kind.as_str(),
                    "response.output_text.delta" | "response.function_call_arguments.delta" | "response.refusal.delta"
                ) {
                    let delta = data["delta"].as_str().unwrap_or_default();
                    observed = observed.saturating_add(tokens_of(counter.as_deref(), delta));
                }
                let terminal = is_terminal(&kind);
                let usage = terminal.then(|| Usage {
                    service_tier: data["response"]["service_tier"].as_str().and_then(|t| t.parse().ok()),
                    ..settled(data["response"].get("usage"), prompt_estimate, observed)
                });
                started = true;
                yield Read::Event(PassthroughEvent { kind, data, output_tokens: observed, usage });
                if terminal {
                    ended = true;
                    break;
                }
            }
            if failure.is_none() && !ended {
                // As for chat streams: a member that breaks off mid-answer is a 502.
                failure = Some(format!("{base}: the stream ended before the response did"));
            }
            yield Read::End { started, failure };
        }
    };
    Box::pin(failover(
        client,
        candidates,
        credentials,
        "/v1/responses".to_string(),
        body,
        "event",
        |_: &Member| tracing::Span::current(),
        read,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::UsageSource;
    use serde_json::json;

    #[test]
    fn responses_usage_is_billed_never_below_what_streamed_by() {
        let u = settled(
            Some(&json!({"input_tokens": 21, "output_tokens": 12,
                          "input_tokens_details": {"cached_tokens": 5}})),
            99,
            3,
        );
        assert_eq!(
            (
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_tokens,
                u.source
            ),
            (21, 12, 5, UsageSource::Upstream)
        );
        let u = settled(
            Some(&json!({"input_tokens": 21, "output_tokens": 0})),
            99,
            3,
        );
        assert_eq!((u.completion_tokens, u.source), (3, UsageSource::Observed));
        let u = settled(None, 99, 3);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.source),
            (99, 3, UsageSource::Observed)
        );
        assert!(is_terminal("response.incomplete") && !is_terminal("response.created"));
    }
}
