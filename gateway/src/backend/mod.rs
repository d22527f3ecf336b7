//! The seam between the gateway and whatever runs a model.
//!
//! The gateway never touches candle: it reaches a model through [`Backend`]. The `tollgate`
//! binary implements it for the in-process engine; a later HTTP backend implements it for
//! workers and other OpenAI-compatible servers. A backend validates what only it can know
//! (token counts against the context) and reports real token usage.

mod adapter;
pub mod upstream;

pub use adapter::{adapter_key, adapter_keys, check_adapter, AdapterBackend};

use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use futures::Stream;
use serde::{Deserialize, Serialize};

/// One chat message, already flattened to text (content parts joined by the gateway).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
    /// The calls an assistant message made (earlier turns of a function-calling loop).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For `tool` messages: the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A plain message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A function call made by the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// `call_…`.
    pub id: String,
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

/// What the output must be (`response_format`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    #[default]
    Text,
    /// Exactly one JSON object.
    JsonObject,
    /// JSON valid against `schema`.
    JsonSchema {
        name: String,
        schema: serde_json::Value,
        #[serde(default)]
        strict: bool,
    },
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    pub parameters: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// Never call; the tools are not shown to the model.
    None,
    /// The model chooses between prose and calls.
    #[default]
    Auto,
    /// At least one call, nothing else.
    Required,
    /// A call of this function, nothing else.
    Function(String),
}

/// The tools offered with a chat request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolsRequest {
    pub tools: Vec<ToolDef>,
    pub choice: ToolChoice,
    /// Whether several calls may come in one answer.
    pub parallel: bool,
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template (generation prompt added).
    Chat(Vec<ChatMessage>),
    /// Raw text for `/v1/completions`, tokenized as is.
    Text(String),
}

/// Sampling controls for one sequence. Ranges were validated by the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Upper bound of generated tokens; `None` means "up to the end of the context".
    pub max_tokens: Option<u32>,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means disabled.
    pub top_k: u32,
    pub seed: Option<u64>,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// 1.0 means disabled.
    pub repetition_penalty: f32,
    /// Stop strings; never emitted, matched across token boundaries.
    pub stop: Vec<String>,
    /// `Some(k)`: return the chosen token's logprob and the `k` most likely alternatives.
    pub logprobs: Option<u32>,
    /// OpenAI's `logit_bias`: token id and bias in [-100, 100], by token id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
            stop: Vec::new(),
            logprobs: None,
            logit_bias: Vec::new(),
        }
    }
}

/// One generation request: a single sequence (the gateway fans out `n > 1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The gateway's request id (UUID v7), for logs.
    pub request_id: String,
    /// Model id as the client named it.
    pub model: String,
    pub prompt: Prompt,
    pub params: SamplingParams,
    /// What the output must be; enforced by the backend (or refused).
    #[serde(default)]
    pub response_format: ResponseFormat,
    /// Functions the model may call (chat only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<ToolsRequest>,
    /// The customer, for backends that share a model fairly between customers; set by the
    /// gateway after authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// The customer's share of the model when customers compete (1 = equal); set with
    /// `customer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling_weight: Option<u32>,
    /// The tier the gateway admitted the request at: the engine's class for it (set by the
    /// gateway with `customer`).
    #[serde(default)]
    pub service_tier: ServiceTier,
    /// How long a `flex` request may wait for the engine to admit it before it is refused
    /// ([`BackendError::NoCapacity`]); `None`: as long as it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue_wait: Option<std::time::Duration>,
    /// The output the client expects (OpenAI's Predicted Outputs, chat only): a draft the
    /// backend verifies, which never changes the output; refused by a backend that cannot
    /// take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<String>,
    /// The LoRA adapter the model runs with: set by the backend of an adapter's model id
    /// (`<base>:<name>`) before it hands the request to its base model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterRef>,
}

/// A LoRA adapter a request runs with: its name (in its model id) and its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterRef {
    pub name: String,
    /// The PEFT adapter directory. `None` only for an operator's adapter on a pool of
    /// `tollgate worker`s declared without `source`: the workers' own adapter of that name
    /// (declared in their models.toml) is used.
    pub path: Option<std::path::PathBuf>,
}

/// Log probability of one token, with its text and bytes as OpenAI reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// The chosen token's log probability and the top alternatives at that position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogprobEntry {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// The class of service a request is served at (the ledger's vocabulary).
pub use tollgate_metering::kinds::ServiceTier;

/// Why a sequence stopped (the ledger's vocabulary: it is recorded as it is sent).
pub use tollgate_metering::kinds::FinishReason;

/// Token counts of one sequence, from the model's own tokenizer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Of `prompt_tokens`, those served from a prefix cache (OpenAI's
    /// `prompt_tokens_details.cached_tokens`), billed at the cached input price.
    #[serde(default)]
    pub cached_tokens: u32,
    /// Where these counts came from.
    #[serde(default)]
    pub source: UsageSource,
    /// The tier the server says it served the sequence at (an upstream's `service_tier`);
    /// `None` when it does not say (the engine serves the tier it was asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<ServiceTier>,
    /// Tokens of the request's prediction kept in the output (a part of `completion_tokens`)
    /// and computed then thrown away (not a part of it): OpenAI's
    /// `completion_tokens_details.accepted_prediction_tokens` and
    /// `rejected_prediction_tokens`.
    #[serde(default)]
    pub accepted_prediction_tokens: u32,
    #[serde(default)]
    pub rejected_prediction_tokens: u32,
}

/// Where a backend's counts came from, most trusted to least trusted (a record's field).
pub use tollgate_metering::kinds::UsageSource;

/// What a backend streams back for one sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GenerateEvent {
    /// The prompt was accepted; sent once, before any text.
    Started { prompt_tokens: u32 },
    /// New text (possibly empty while held back by a stop-string prefix) and one logprob
    /// entry per token. `completion_tokens` counts the tokens generated so far, so a client
    /// that goes away is billed exactly for what the model produced.
    Delta {
        text: String,
        logprobs: Vec<LogprobEntry>,
        completion_tokens: u32,
    },
    /// Part of a function call, as OpenAI streams them: the first part of call `index` carries
    /// its `id` and `name`, later parts more `arguments` text. Tokens are counted by the
    /// `Delta` events.
    ToolCallDelta {
        index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
    /// The last event of a successful sequence.
    Finished { reason: FinishReason, usage: Usage },
}

/// Errors a backend reports; the gateway maps each to an OpenAI-shaped response.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The request is invalid for this model (e.g. prompt plus `max_tokens` beyond the context).
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The backend's queue is full; the client should retry after the given seconds.
    #[error("the model is overloaded, retry after {retry_after_secs}s")]
    Overloaded { retry_after_secs: u64 },
    /// The model is being loaded and as many requests as its queue holds already wait for
    /// it; the client should retry after the given seconds.
    #[error("the model is loading, retry after {retry_after_secs}s")]
    Loading { retry_after_secs: u64 },
    /// A `flex` request was not admitted within the model's `flex_max_wait_secs` (it never
    /// started); the client may retry after the given seconds.
    #[error("no capacity for a flex request, retry after {retry_after_secs}s")]
    NoCapacity { retry_after_secs: u64 },
    /// No server behind the backend could take the request (all down or failing); the
    /// detail goes to logs only.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend is down or failed; the detail goes to logs only.
    #[error("backend failure: {0}")]
    Internal(String),
    /// The request's LoRA adapter cannot be applied to its base model (its files are missing,
    /// malformed, or shaped for another model): a server error on a request (the detail goes
    /// to logs only), a 400 naming the problem when the adapter is being registered.
    #[error("{0}")]
    Adapter(String),
    /// The server behind the backend failed after it had begun answering (its connection
    /// broke mid-stream), so the request could not move to another; the detail goes to logs
    /// only.
    #[error("upstream broke off: {0}")]
    Broken(String),
    /// The server behind the backend refused the operator's credentials for it (401/403):
    /// the model is misconfigured, not the request; the detail goes to logs only.
    #[error("upstream refused the credentials: {0}")]
    Credentials(String),
    /// The server behind the backend refused the request itself with a client error (a 4xx
    /// other than 401, 403 and 429), which keeps its status.
    #[error("{message}")]
    Refused {
        status: u16,
        message: String,
        param: Option<String>,
    },
}

/// A stream of events for one sequence. Dropping it cancels the sequence at once.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, BackendError>> + Send>>;

/// One event of an upstream's own Responses API stream (`/v1/responses` passed through).
#[derive(Debug, Clone, PartialEq)]
pub struct PassthroughEvent {
    /// Its `type` (`response.created`, `response.output_text.delta`, ...).
    pub kind: String,
    pub data: serde_json::Value,
    /// Output tokens seen so far (counted as for chat streams).
    pub output_tokens: u32,
    /// On the last event (`response.completed`, `.incomplete` or `.failed`): the usage to
    /// bill, from the upstream's and never below what was seen.
    pub usage: Option<Usage>,
}

/// An upstream response's events, ending with its last one (or an error).
pub type PassthroughStream =
    Pin<Box<dyn Stream<Item = Result<PassthroughEvent, BackendError>> + Send>>;

/// Static facts about a served model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    pub context_length: u32,
    /// Unix seconds when the model was loaded (for `created` in `/v1/models`).
    pub created: u64,
    pub owned_by: String,
}

/// Live load, for routing and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub running: u32,
    pub waiting: u32,
    pub kv_cache_used_bytes: u64,
    pub kv_cache_capacity_bytes: u64,
    /// Sequences in the engine's last forward pass.
    #[serde(default)]
    pub batch_size: u32,
    /// Forward passes, prompt tokens prefilled and tokens decoded since start.
    #[serde(default)]
    pub steps_total: u64,
    /// Of those, passes that started newcomers between the layers of another pass.
    #[serde(default)]
    pub interleaved_steps_total: u64,
    #[serde(default)]
    pub prefill_tokens_total: u64,
    #[serde(default)]
    pub decode_tokens_total: u64,
    /// KV memory the prefix cache holds, and prompt tokens it saved from prefill since start.
    #[serde(default)]
    pub prefix_cache_bytes: u64,
    #[serde(default)]
    pub prefix_hit_tokens_total: u64,
}

/// Whether a model that loads on demand is in memory now, what it takes there and how long
/// its loads took (for `/metrics`, the console and `GET /admin/v1/models`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Residency {
    /// `unloaded`, `loading`, `loaded` or `draining` (loaded, finishing its requests in
    /// flight before it unloads).
    pub state: ResidencyState,
    /// Kept loaded whatever the memory budget (`pinned = true`).
    pub pinned: bool,
    /// What the model counts against `model_memory_bytes`: its weights file's size plus its
    /// KV cache reservation (`kv_cache_bytes`).
    pub memory_bytes: u64,
    /// The last load's duration, if it ever loaded.
    pub load_seconds: Option<f64>,
    pub loads_total: u64,
    pub unloads_total: u64,
    /// The durations of the latest loads, oldest first (at most [`RECENT_LOADS`]), for the
    /// load-time histogram to catch up at each scrape.
    #[serde(skip)]
    pub recent_load_seconds: Vec<f64>,
    /// Requests using the loaded model now.
    pub in_use: u64,
}

/// Load durations a [`Residency`] keeps.
pub const RECENT_LOADS: usize = 64;

/// Where a model that loads on demand stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResidencyState {
    #[default]
    Unloaded,
    Loading,
    Loaded,
    Draining,
}

/// Counts tokens of text with a model's tokenizer, for backends that do not report their own
/// counts reliably (an upstream that omits `usage` or whose stream is cut). Supplied by the
/// binary, which has the tokenizers; the gateway never loads one itself.
pub trait TokenCounter: Send + Sync + 'static {
    fn count(&self, text: &str) -> u32;
}

/// Starts a prepared sequence.
pub type Start = Box<dyn FnOnce() -> Result<EventStream, BackendError> + Send>;

/// A sequence whose prompt is tokenized and checked but not yet started, so the gateway can
/// reserve rate limits and budget from its real token counts before any work is queued.
pub struct Prepared {
    pub prompt_tokens: u32,
    /// The most tokens it may generate: its `max_tokens`, or the rest of the context.
    pub max_tokens: u32,
    pub start: Start,
    /// Tokens generated so far, kept current by the backend as they are produced (also those
    /// not yet read from the stream), so a client that goes away is billed for all of them.
    pub progress: Option<Arc<AtomicUsize>>,
    /// Prompt tokens served from the backend's prefix cache, set once the sequence is admitted
    /// (before `Finished` reports them), so a client that goes away is billed them at the
    /// cached price too.
    pub cached: Option<Arc<AtomicUsize>>,
}

/// Something that can run a model.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    fn info(&self) -> ModelInfo;

    /// Tokenizes and validates one sequence. Errors known before generation (validation) are
    /// returned here; `start` can still fail with an overload; later failures arrive as an
    /// `Err` item in the stream.
    async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, BackendError>;

    /// Prepares and starts one sequence.
    async fn generate(&self, request: GenerateRequest) -> Result<EventStream, BackendError> {
        let prepared = self.prepare(request).await?;
        (prepared.start)()
    }

    fn load(&self) -> LoadReport {
        LoadReport::default()
    }

    /// For models loaded on demand within the memory budget: where the model stands; `None`
    /// for backends always ready (upstreams).
    fn residency(&self) -> Option<Residency> {
        None
    }

    /// For backends that route to other servers: each server and whether it is in rotation.
    fn members(&self) -> Vec<(String, bool)> {
        Vec::new()
    }

    /// Whether the backend reads a LoRA adapter's files only when a request runs (a pool of
    /// workers), not in `prepare` (a local engine): [`check_adapter`] then runs its probe.
    fn reads_adapters_when_run(&self) -> bool {
        false
    }

    /// The LoRA adapters loaded beside the model's engine now (name and directory), for a
    /// worker's `/health` ([`adapter_keys`]); none for backends without an engine here.
    fn loaded_adapters(&self) -> Vec<AdapterRef> {
        Vec::new()
    }

    /// Whether `/v1/responses` requests go to the server's own Responses API
    /// ([`Backend::start_responses`]) rather than being translated to chat.
    fn passes_responses_through(&self) -> bool {
        false
    }

    /// Starts a Responses API request (`body` as the client sent it, the model name and
    /// conversation already set by the gateway) on the server's own `/v1/responses`, streamed.
    /// `prompt_estimate` stands in for input tokens the server does not report.
    fn start_responses(
        &self,
        _body: serde_json::Value,
        _prompt_estimate: u32,
    ) -> Result<PassthroughStream, BackendError> {
        Err(BackendError::Internal(
            "this backend does not speak the Responses API".into(),
        ))
    }
}
