//! The Responses API's bodies in OpenAI's shapes: the response object, its output items, usage
//! and stream events, the stored input items and the deletion answer. The handlers serialize
//! these types and `/openapi.json` describes them; `output` fills them.

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// A text part of a message the model produced.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutputText {
    #[serde(rename = "type")]
    #[schema(value_type = String, pattern = "^output_text$")]
    pub kind: &'static str,
    pub text: String,
    pub annotations: Vec<Value>,
    pub logprobs: Vec<Value>,
}

impl OutputText {
    pub fn new(text: String) -> Self {
        Self {
            kind: "output_text",
            text,
            annotations: Vec::new(),
            logprobs: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    InProgress,
    Completed,
    Incomplete,
}

/// An item of a response's `output`.
#[derive(Debug, Clone, Serialize, ToSchema)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseStatus {
    /// A background response not started yet.
    Queued,
    InProgress,
    Completed,
    Incomplete,
    Failed,
    /// A background response cancelled before it ended (set in the stored object by the
    /// ledger's cancel, in the same transaction that stops its run).
    #[expect(
        dead_code,
        reason = "written by metering's cancel; typed here for the document"
    )]
    Cancelled,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IncompleteDetails {
    pub reason: String,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct InputTokensDetails {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u64,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseTextConfig {
    pub format: Value,
}

/// The reasoning settings a response echoes (this server's models do not reason: both null).
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct Reasoning {
    #[schema(required)]
    pub effort: Option<String>,
    #[schema(required)]
    pub summary: Option<String>,
}

/// The tool choice a response echoes: `none`, `auto`, `required`, or one named function.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoiceEcho {
    Mode(String),
    Function {
        /// Always `function`.
        #[serde(rename = "type")]
        kind: String,
        name: String,
    },
}

/// The response object (`POST /v1/responses`, `GET /v1/responses/{id}`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Response {
    pub id: String,
    #[schema(value_type = String, pattern = "^response$")]
    pub object: &'static str,
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
    pub reasoning: Reasoning,
    pub store: bool,
    pub temperature: f64,
    pub text: ResponseTextConfig,
    pub tool_choice: ToolChoiceEcho,
    pub tools: Vec<Value>,
    pub top_p: f64,
    #[schema(value_type = String)]
    pub truncation: &'static str,
    #[schema(required)]
    pub usage: Option<ResponseUsage>,
    #[schema(required)]
    pub user: Option<String>,
    /// The request's `metadata`, as sent.
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
    pub metadata: Map<String, Value>,
    /// The class of service that served the response (and that it is billed at).
    pub service_tier: crate::backend::ServiceTier,
}

/// One event of a streamed response: its fields, then `type` and `sequence_number`.
#[derive(Debug, Clone, Serialize)]
pub struct StreamEvent {
    #[serde(flatten)]
    pub body: EventBody,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub sequence_number: u64,
}

/// The fields of a stream event, by kind.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EventBody {
    /// `response.created`, `.in_progress`, `.completed`, `.incomplete`, `.failed`.
    Response { response: Box<Response> },
    /// `response.output_item.added` and `.done`.
    Item {
        output_index: usize,
        item: OutputItem,
    },
    /// `response.content_part.added` and `.done`.
    Part {
        item_id: String,
        output_index: usize,
        content_index: u32,
        part: OutputText,
    },
    /// `response.output_text.delta`.
    TextDelta {
        item_id: String,
        output_index: usize,
        content_index: u32,
        delta: String,
        logprobs: Vec<Value>,
    },
    /// `response.output_text.done`.
    TextDone {
        item_id: String,
        output_index: usize,
        content_index: u32,
        text: String,
        logprobs: Vec<Value>,
    },
    /// `response.function_call_arguments.delta`.
    ArgumentsDelta {
        item_id: String,
        output_index: usize,
        delta: String,
    },
    /// `response.function_call_arguments.done`.
    ArgumentsDone {
        item_id: String,
        output_index: usize,
        name: String,
        arguments: String,
    },
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InputContent {
    /// `input_text` (user, system, developer) or `output_text` (assistant).
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
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

impl InputItem {
    pub fn id(&self) -> &str {
        match self {
            Self::Message { id, .. }
            | Self::FunctionCall { id, .. }
            | Self::FunctionCallOutput { id, .. } => id,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseItemList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
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
    #[schema(value_type = String, pattern = "^response$")]
    pub object: &'static str,
    pub deleted: bool,
}
