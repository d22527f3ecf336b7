//! The answers in OpenAI's shapes, as typed values: the bodies are the types of
//! [`crate::api::openai`] (which `/openapi.json` describes), the streamed chunks are defined here.

use serde::Serialize;
use serde_json::Value;

use super::fold::ChoiceResult;
use crate::api::openai::{
    ChatChoiceLogprobs, ChatCompletionMessageToolCall, ChatCompletionResponseMessage,
    ChatCompletionTokenLogprob, CompletionLogprobs, CompletionUsage, FunctionCall, TopLogprob,
};
use crate::backend::{FinishReason, LogprobEntry, ServiceTier, TokenLogprob};

fn top(t: &TokenLogprob) -> TopLogprob {
    TopLogprob {
        token: t.token.clone(),
        logprob: f64::from(t.logprob),
        bytes: Some(t.bytes.clone()),
    }
}

/// Chat shape: `{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": null}`.
pub(super) fn chat_logprobs(entries: &[LogprobEntry]) -> ChatChoiceLogprobs {
    let content = entries
        .iter()
        .map(|e| ChatCompletionTokenLogprob {
            token: e.chosen.token.clone(),
            logprob: f64::from(e.chosen.logprob),
            bytes: Some(e.chosen.bytes.clone()),
            top_logprobs: e.top.iter().map(top).collect(),
        })
        .collect();
    ChatChoiceLogprobs {
        content: Some(content),
        refusal: None,
    }
}

/// Legacy completions shape: parallel arrays, `top_logprobs` as token → logprob maps (most
/// likely first), offsets counted from `text_offset`.
pub(super) fn legacy_logprobs(entries: &[LogprobEntry], text_offset: usize) -> CompletionLogprobs {
    let mut offset = text_offset;
    let mut offsets = Vec::with_capacity(entries.len());
    for e in entries {
        offsets.push(offset);
        offset += e.chosen.token.len();
    }
    CompletionLogprobs {
        tokens: entries.iter().map(|e| e.chosen.token.clone()).collect(),
        token_logprobs: entries
            .iter()
            .map(|e| f64::from(e.chosen.logprob))
            .collect(),
        top_logprobs: entries
            .iter()
            .map(|e| {
                e.top
                    .iter()
                    .map(|t| (t.token.clone(), Value::from(t.logprob)))
                    .collect()
            })
            .collect(),
        text_offset: offsets,
    }
}

/// The assistant message: content is null when the answer is calls only.
pub(super) fn message(r: &ChoiceResult) -> ChatCompletionResponseMessage {
    let calls: Vec<ChatCompletionMessageToolCall> = r
        .tool_calls
        .iter()
        .map(|(id, name, arguments)| ChatCompletionMessageToolCall {
            id: id.clone(),
            kind: "function".into(),
            function: FunctionCall {
                name: name.clone(),
                arguments: arguments.clone(),
            },
        })
        .collect();
    let content = if !calls.is_empty() && r.text.trim().is_empty() {
        None
    } else {
        Some(r.text.clone())
    };
    ChatCompletionResponseMessage {
        role: "assistant".into(),
        content,
        refusal: None,
        tool_calls: (!calls.is_empty()).then_some(calls),
    }
}

/// One server-sent chunk: `chat.completion.chunk` or `text_completion`.
#[derive(Debug, Serialize)]
pub(super) struct Chunk<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: Option<String>,
    /// The tier serving the request: the one it was admitted at, on every chunk (an upstream
    /// that reports another is billed that one, shown by the last chunk with usage).
    pub service_tier: ServiceTier,
    pub choices: Vec<C>,
    /// With `stream_options.include_usage`: `null` on every chunk but the last, which has
    /// no choices and the usage; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<CompletionUsage>>,
}

/// A chat chunk's choice.
#[derive(Debug, Serialize)]
pub(super) struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatChoiceLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// What a chat chunk adds to the message; fields without news are left out.
#[derive(Debug, Default, Serialize)]
pub(super) struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallPart>>,
}

/// A part of call `index`: its id, type and name first, then argument fragments.
#[derive(Debug, Serialize)]
pub(super) struct ToolCallPart {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionPart,
}

#[derive(Debug, Serialize)]
pub(super) struct FunctionPart {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}
