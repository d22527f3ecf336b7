//! The Batch API's wire shapes (OpenAI's): the create request, the batch object and a page of
//! them. The batch object is built from metering's [`BatchRow`].

use serde::{Deserialize, Serialize};
use tollgate_metering::kinds::{BatchStatus, Endpoint};
use tollgate_metering::store::{BatchRow, BatchTimes};
use utoipa::ToSchema;

use super::validate::LineError;

/// `POST /v1/batches`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    /// A `batch` file of the caller's.
    pub input_file_id: String,
    /// `/v1/chat/completions`, `/v1/completions` or `/v1/responses`: every line's `url`.
    #[schema(value_type = String, pattern = "^/v1/(chat/completions|completions|responses)$")]
    pub endpoint: Endpoint,
    /// `24h`
    #[schema(pattern = "^24h$")]
    pub completion_window: String,
    /// Up to 16 string pairs, returned with the batch.
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

impl crate::error::RequestBody for CreateBatch {}

/// A batch's refused lines.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchErrors {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<LineError>,
}

/// Lines by outcome.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RequestCounts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
}

/// Cached prompt tokens.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InputTokensDetails {
    pub cached_tokens: i64,
}

/// Reasoning tokens (none here).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: i64,
}

/// The tokens of a batch's lines (totalled when it ends).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    pub input_tokens: i64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: i64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: i64,
}

/// A batch (`object: "batch"`). Times are Unix seconds, null until the batch gets there.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Batch {
    /// `batch_…`
    pub id: String,
    #[schema(value_type = String, pattern = "^batch$")]
    pub object: &'static str,
    #[schema(value_type = String)]
    pub endpoint: Endpoint,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    /// `validating`, `failed`, `in_progress`, `finalizing`, `completed`, `expired`,
    /// `cancelling` or `cancelled`.
    #[schema(value_type = String)]
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    /// `in_progress_at`, `finalizing_at`, `completed_at`, `failed_at`, `expired_at`,
    /// `cancelling_at`, `cancelled_at`.
    #[serde(flatten)]
    pub times: BatchTimes,
    pub request_counts: RequestCounts,
    pub usage: Usage,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

impl From<&BatchRow> for Batch {
    fn from(b: &BatchRow) -> Self {
        let errors = b
            .errors
            .as_deref()
            .and_then(|e| serde_json::from_str::<Vec<LineError>>(e).ok())
            .map(|data| BatchErrors {
                object: "list",
                data,
            });
        Self {
            id: b.id.clone(),
            object: "batch",
            endpoint: b.endpoint,
            errors,
            input_file_id: b.input_file_id.clone(),
            completion_window: b.completion_window.clone(),
            status: b.status,
            output_file_id: b.output_file_id.clone(),
            error_file_id: b.error_file_id.clone(),
            created_at: b.created_at,
            expires_at: Some(b.expires_at),
            times: b.times.clone(),
            request_counts: RequestCounts {
                total: b.total,
                completed: b.completed,
                failed: b.failed,
            },
            usage: Usage {
                input_tokens: b.usage.input_tokens,
                input_tokens_details: InputTokensDetails {
                    cached_tokens: b.usage.cached_tokens,
                },
                output_tokens: b.usage.output_tokens,
                output_tokens_details: OutputTokensDetails {
                    reasoning_tokens: 0,
                },
                total_tokens: b.usage.input_tokens + b.usage.output_tokens,
            },
            metadata: b
                .metadata
                .as_deref()
                .and_then(|m| serde_json::from_str(m).ok()),
        }
    }
}

/// A page of batches.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<Batch>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}
