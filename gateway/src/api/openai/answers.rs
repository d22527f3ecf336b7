//! The answers of `POST /v1/chat/completions` and `POST /v1/completions` (not streamed), in
//! OpenAI's shapes and under OpenAI's component names: the types the completions handlers
//! serialize and `/openapi.json` describes. `completions::shapes` fills them; the streamed
//! chunks are defined there.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::backend::{FinishReason, ServiceTier};

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u64,
}

/// Tokens of the request's `prediction` (OpenAI's Predicted Outputs; 0 without one).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct CompletionTokensDetails {
    /// Predicted tokens that appeared in the answer: a part of `completion_tokens`.
    pub accepted_prediction_tokens: u64,
    /// Predicted tokens computed and thrown away: not a part of `completion_tokens` here,
    /// but billed beside them (at the model's `price.rejected_prediction_per_mtok`, the
    /// output price unless set).
    pub rejected_prediction_tokens: u64,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct CompletionUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens_details: CompletionTokensDetails,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON text.
    pub arguments: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionMessageToolCall {
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    #[schema(pattern = "^function$")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionResponseMessage {
    #[schema(pattern = "^assistant$")]
    pub role: String,
    #[schema(required)]
    pub content: Option<String>,
    #[schema(required)]
    pub refusal: Option<String>,
    /// Present only when the model called functions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ChatCompletionMessageToolCall>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionTokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoiceLogprobs {
    pub content: Option<Vec<ChatCompletionTokenLogprob>>,
    pub refusal: Option<Vec<ChatCompletionTokenLogprob>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChoice {
    pub index: u32,
    pub message: ChatCompletionResponseMessage,
    #[schema(required)]
    pub logprobs: Option<ChatChoiceLogprobs>,
    #[schema(required)]
    pub finish_reason: Option<FinishReason>,
}

/// `POST /v1/chat/completions` without `stream` (with it: `chat.completion.chunk` events).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreateChatCompletionResponse {
    pub id: String,
    #[schema(pattern = "^chat\\.completion$")]
    pub object: String,
    pub created: u64,
    pub model: String,
    #[schema(required)]
    pub system_fingerprint: Option<String>,
    pub choices: Vec<ChatCompletionChoice>,
    pub usage: CompletionUsage,
    /// The class of service that served the request (and that it is billed at).
    pub service_tier: ServiceTier,
}

/// Legacy completions logprobs: parallel arrays.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f64>,
    /// Token → logprob, most likely first (an ordered map).
    #[schema(value_type = Vec<std::collections::BTreeMap<String, f64>>)]
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    #[schema(value_type = Vec<u64>)]
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    #[schema(required)]
    pub logprobs: Option<CompletionLogprobs>,
    #[schema(required)]
    pub finish_reason: Option<FinishReason>,
}

/// `POST /v1/completions` without `stream`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreateCompletionResponse {
    pub id: String,
    #[schema(pattern = "^text_completion$")]
    pub object: String,
    pub created: u64,
    pub model: String,
    #[schema(required)]
    pub system_fingerprint: Option<String>,
    pub choices: Vec<CompletionChoice>,
    pub usage: CompletionUsage,
    /// The class of service that served the request (and that it is billed at).
    pub service_tier: ServiceTier,
}
