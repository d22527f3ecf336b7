//! OpenAI request bodies and their validation into backend requests.
//!
//! Unknown fields are ignored (SDKs send fields we do not use); known fields are range-checked
//! with messages that name the value, and a known field the server cannot honour is refused.
//! `response_format` and `tools` are validated here and enforced by the backend (constrained
//! decoding in the engine, or the upstream). Responses are built in `completions`.
//!
//! This file holds the bodies as they deserialize; `plan` validates them into a [`Plan`];
//! `answers` holds the bodies the completions handlers answer with.

use serde::Deserialize;
use utoipa::ToSchema;

use crate::error::{ApiError, RequestBody};

mod answers;
mod plan;

pub use answers::*;
pub use plan::{Plan, MAX_STOP};

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `service_tier` as a request asks for it (OpenAI's values): `auto` is the key's default
/// tier, else its customer's, else `default`. `batch` is the Batch API's alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestedTier {
    Auto,
    Default,
    Flex,
    Priority,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CommonParams {
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    #[schema(minimum = 1)]
    pub n: Option<u32>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<i64>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f32>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f32>,
    pub user: Option<String>,
    /// OpenAI's `metadata`: string pairs stored on the usage record as tags.
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    pub metadata: Option<tollgate_metering::tags::Tags>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// vLLM-style extras.
    pub top_k: Option<u32>,
    #[schema(minimum = 0.01, maximum = 10)]
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// The class of service to run at; the answer says the one that served it.
    pub service_tier: Option<RequestedTier>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    /// Only `text` parts are supported.
    #[serde(rename = "type")]
    #[schema(pattern = "^text$")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct MessageIn {
    #[schema(pattern = "^(system|developer|user|assistant|tool)$")]
    pub role: String,
    pub content: Option<MessageContent>,
    /// Assistant messages: the calls the model made.
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// Tool messages: the call answered.
    pub tool_call_id: Option<String>,
}

/// `function` inside a tool call or a tool definition.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FunctionCallIn {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ToolCallIn {
    pub id: String,
    #[serde(rename = "type")]
    #[schema(pattern = "^function$")]
    pub kind: String,
    pub function: FunctionCallIn,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FunctionDefIn {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ToolIn {
    #[serde(rename = "type")]
    #[schema(pattern = "^function$")]
    pub kind: String,
    pub function: FunctionDefIn,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NamedFunction {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    #[schema(pattern = "^function$")]
    pub kind: String,
    pub function: NamedFunction,
}

/// `"none" | "auto" | "required" | {"type": "function", "function": {"name"}}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoiceIn {
    Mode(String),
    Named(NamedToolChoice),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct JsonSchemaIn {
    pub name: String,
    pub description: Option<String>,
    pub schema: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponseFormatIn {
    #[serde(rename = "type")]
    #[schema(pattern = "^(text|json_object|json_schema)$")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaIn>,
}

/// OpenAI's Predicted Outputs: text the answer is expected to repeat much of (a file being
/// edited). Verified as a draft, it never changes the answer, only how fast it comes;
/// `usage.completion_tokens_details` counts its tokens accepted and rejected.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct PredictionIn {
    /// Only `content`.
    #[serde(rename = "type")]
    #[schema(pattern = "^content$")]
    pub kind: String,
    /// The predicted text, or text parts.
    pub content: MessageContent,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(as = CreateChatCompletionRequest)]
pub struct ChatRequest {
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<MessageIn>,
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    /// Requires `logprobs: true`.
    #[schema(maximum = 20)]
    pub top_logprobs: Option<u32>,
    pub response_format: Option<ResponseFormatIn>,
    pub tools: Option<Vec<ToolIn>>,
    pub tool_choice: Option<ToolChoiceIn>,
    pub parallel_tool_calls: Option<bool>,
    pub prediction: Option<PredictionIn>,
    /// The deprecated forms of `tools` / `tool_choice`: refused, not ignored (and not in the
    /// OpenAPI document).
    #[schema(ignore)]
    pub functions: Option<serde_json::Value>,
    #[schema(ignore)]
    pub function_call: Option<serde_json::Value>,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// A prompt: text, a list of texts, or token ids (refused).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(as = CreateCompletionRequest)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptIn,
    #[schema(maximum = 5)]
    pub logprobs: Option<u32>,
    /// Only `false` is supported.
    pub echo: Option<bool>,
    /// Only an empty suffix is supported.
    #[schema(max_length = 0)]
    pub suffix: Option<String>,
    #[schema(minimum = 1, maximum = 1)]
    pub best_of: Option<u32>,
    /// vLLM-style structured output for completions.
    pub response_format: Option<ResponseFormatIn>,
    #[serde(flatten)]
    pub common: CommonParams,
}

fn check_common(body: &[u8]) -> Result<(), serde_path_to_error::Error<serde_json::Error>> {
    serde_path_to_error::deserialize::<_, CommonParams>(&mut serde_json::Deserializer::from_slice(
        body,
    ))
    .map(drop)
}

/// The fields of [`CommonParams`].
macro_rules! common_fields {
    ($($extra:literal),* $(,)?) => {
        &[
            "max_tokens", "temperature", "top_p", "n", "stop", "seed", "frequency_penalty",
            "presence_penalty", "user", "metadata", "stream", "stream_options", "top_k",
            "repetition_penalty", "logit_bias", "service_tier", $($extra),*
        ]
    };
}

impl RequestBody for ChatRequest {
    const FIELDS: &'static [&'static str] = common_fields!(
        "model",
        "messages",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "prediction",
        "functions",
        "function_call",
    );

    fn check_flattened(body: &[u8]) -> Result<(), serde_path_to_error::Error<serde_json::Error>> {
        check_common(body)
    }
}

impl RequestBody for CompletionRequest {
    const FIELDS: &'static [&'static str] = common_fields!(
        "model",
        "prompt",
        "logprobs",
        "echo",
        "suffix",
        "best_of",
        "response_format",
    );

    fn check_flattened(body: &[u8]) -> Result<(), serde_path_to_error::Error<serde_json::Error>> {
        check_common(body)
    }
}

impl CommonParams {
    /// The request's cost-allocation tags (`metadata` and `user`), or a 400 naming the field.
    pub fn tags(&self) -> Result<tollgate_metering::tags::Tags, ApiError> {
        tollgate_metering::tags::from_request(self.metadata.as_ref(), self.user.as_deref()).map_err(
            |e| ApiError::InvalidRequest {
                message: e.message,
                param: Some(e.param),
            },
        )
    }
}
