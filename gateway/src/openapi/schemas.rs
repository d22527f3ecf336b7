//! The response bodies of the public API, typed for the OpenAPI document: field for field what
//! the handlers write (in OpenAI's shapes and under OpenAI's component names), so the document
//! says what a client receives. The completions handlers serialize these very types. The request bodies are the handlers' own types
//! ([`crate::api::openai`], the Responses API's `CreateResponse`); these describe what they answer.
//! The `openapi` tests and the Schemathesis run check real responses against them.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// `{"error": {...}}`: every error, whatever its status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorObject,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorObject {
    pub message: String,
    /// `invalid_request_error`, `rate_limit_exceeded`, `insufficient_quota`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(required)]
    pub param: Option<String>,
    #[schema(required)]
    pub code: Option<String>,
}

pub use crate::backend::FinishReason;

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct CompletionUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens_details: PromptTokensDetails,
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
}

/// Legacy completions logprobs: parallel arrays.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f64>,
    /// Token → logprob, most likely first (an ordered map).
    #[schema(value_type = Vec<BTreeMap<String, f64>>)]
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
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    #[schema(pattern = "^model$")]
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListModelsResponse {
    #[schema(pattern = "^list$")]
    pub object: String,
    pub data: Vec<Model>,
}

/// A text part of a message the model produced.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutputText {
    #[serde(rename = "type")]
    #[schema(pattern = "^output_text$")]
    pub kind: String,
    pub text: String,
    pub annotations: Vec<Value>,
    pub logprobs: Vec<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    InProgress,
    Completed,
    Incomplete,
}

/// An item of a response's `output`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    Message {
        id: String,
        status: ItemStatus,
        role: String,
        content: Vec<OutputText>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        status: ItemStatus,
    },
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseStatus {
    InProgress,
    Completed,
    Incomplete,
    Failed,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IncompleteDetails {
    pub reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InputTokensDetails {
    pub cached_tokens: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseTextConfig {
    pub format: Value,
}

/// The response object (`POST /v1/responses`, `GET /v1/responses/{id}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Response {
    pub id: String,
    #[schema(pattern = "^response$")]
    pub object: String,
    pub created_at: u64,
    pub status: ResponseStatus,
    pub background: bool,
    #[schema(required)]
    pub error: Option<ResponseError>,
    #[schema(required)]
    pub incomplete_details: Option<IncompleteDetails>,
    #[schema(required)]
    pub instructions: Option<String>,
    #[schema(required)]
    pub max_output_tokens: Option<u32>,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub parallel_tool_calls: bool,
    #[schema(required)]
    pub previous_response_id: Option<String>,
    pub reasoning: Value,
    pub store: bool,
    pub temperature: f64,
    pub text: ResponseTextConfig,
    pub tool_choice: Value,
    pub tools: Vec<Value>,
    pub top_p: f64,
    pub truncation: String,
    #[schema(required)]
    pub usage: Option<ResponseUsage>,
    #[schema(required)]
    pub user: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InputContent {
    /// `input_text` (user, system, developer) or `output_text` (assistant).
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
}

/// An item of a stored response's input, as `input_items` lists it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputItem {
    Message {
        id: String,
        role: String,
        status: ItemStatus,
        content: Vec<InputContent>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        status: ItemStatus,
    },
    FunctionCallOutput {
        id: String,
        call_id: String,
        output: String,
        status: ItemStatus,
    },
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseItemList {
    #[schema(pattern = "^list$")]
    pub object: String,
    pub data: Vec<InputItem>,
    #[schema(required)]
    pub first_id: Option<String>,
    #[schema(required)]
    pub last_id: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedResponse {
    pub id: String,
    #[schema(pattern = "^response$")]
    pub object: String,
    pub deleted: bool,
}

/// One group of a usage bucket (`organization.usage.completions.result`).
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionsUsageResult {
    pub object: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub input_cached_tokens: i64,
    pub input_audio_tokens: i64,
    pub output_audio_tokens: i64,
    pub num_model_requests: i64,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub api_key_id: Option<String>,
    pub model: Option<String>,
    pub batch: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionsUsageBucket {
    #[schema(pattern = "^bucket$")]
    pub object: String,
    pub start_time: i64,
    pub end_time: i64,
    pub results: Vec<CompletionsUsageResult>,
}

/// `GET /v1/organization/usage/completions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageResponse {
    #[schema(pattern = "^page$")]
    pub object: String,
    pub data: Vec<CompletionsUsageBucket>,
    pub has_more: bool,
    #[schema(required)]
    pub next_page: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CostAmount {
    pub value: f64,
    pub currency: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CostsResult {
    pub object: String,
    pub amount: CostAmount,
    pub line_item: Option<String>,
    pub project_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CostsBucket {
    #[schema(pattern = "^bucket$")]
    pub object: String,
    pub start_time: i64,
    pub end_time: i64,
    pub results: Vec<CostsResult>,
}

/// `GET /v1/organization/costs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CostsResponse {
    #[schema(pattern = "^page$")]
    pub object: String,
    pub data: Vec<CostsBucket>,
    pub has_more: bool,
    #[schema(required)]
    pub next_page: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelLoad {
    pub id: String,
    pub running: u64,
    pub waiting: u64,
    pub kv_cache_used_bytes: u64,
    pub kv_cache_capacity_bytes: u64,
}

/// `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub models: Vec<ModelLoad>,
}

/// One server-sent event of a streamed answer (`stream: true`). For chat completions and
/// completions, `data` is a `chat.completion.chunk` / `text_completion` object as JSON and the
/// last event's `data` is `[DONE]`; for responses, `event` is the event type
/// (`response.created`, `response.output_text.delta`, ... `response.completed`) and `data` the
/// event object as JSON.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerSentEvent {
    pub event: Option<String>,
    pub data: String,
    pub id: Option<String>,
    pub retry: Option<u64>,
}
