//! One line of a batch, run through the handler of its batch's endpoint (the direct request's
//! path: plan, admission, routing, accounting) as the key that created the batch, at the
//! `batch` tier; its answer becomes its output file line (2xx) or error file line (OpenAI's
//! shapes: `{"id","custom_id","response":{"status_code","request_id","body"},"error"}`).

use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Value};
use tollgate_metering::kinds::{Endpoint, LineState};
use tollgate_metering::store::{BatchUsage, ClaimedLine, LineResult, Store};

use crate::api::{completions, responses};
use crate::error::{parse_json, ApiError, ApiJson, ApiJsonValue};
use crate::{AppState, RequestId};

/// The most bytes of an answer kept as a line's result.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// The request id of line `custom_id` of batch `batch_id` on its `retries`-th retry: the same
/// on every run of the line that is not a retry, so that its usage record (whose id it is) is
/// written once however often a runner that died ran it. A retry (the engine failed the line:
/// its record is uncharged) gets an id of its own. A UUID (version 8) from the SHA-256 of them.
pub fn request_id(batch_id: &str, custom_id: &str, retries: i64) -> String {
    let seed = if retries == 0 {
        format!("{batch_id}\n{custom_id}")
    } else {
        format!("{batch_id}\n{custom_id}\n{retries}")
    };
    let d = tollgate_metering::secrets::digest(&seed);
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&d[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// What running a line came to.
pub enum Ran {
    Done(LineResult),
    /// Refused for now (the engines' queues full, a rate limit or a concurrency cap): nothing
    /// ran and nothing was billed; it runs again later.
    Later,
    /// The engine failed it (a worker died under it, a backend error): its record is
    /// uncharged, and it runs again as its next retry.
    Again,
}

/// How often a line the engines failed runs again before its failure is its result.
pub const MAX_RETRIES: i64 = 3;

/// Whether a refusal is for now only: a 503, or a 429 other than the budget's.
fn refused_for_now(status: StatusCode, code: Option<&str>) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE
        || (status == StatusCode::TOO_MANY_REQUESTS
            && matches!(code, Some("rate_limit_exceeded" | "resource_unavailable")))
}

/// Whether the engine (ours or an upstream) failed the request, not the request itself: a
/// 500 or a 502 other than an upstream's refusal of our credentials. Its record is uncharged.
fn failed_on_our_side(status: StatusCode, code: Option<&str>) -> bool {
    (status == StatusCode::INTERNAL_SERVER_ERROR || status == StatusCode::BAD_GATEWAY)
        && code != Some("upstream_credentials")
}

/// Runs `line` to its result.
pub async fn run(state: &AppState, store: &Store, line: &ClaimedLine) -> Ran {
    let request_id = request_id(&line.batch_id, &line.custom_id, line.retries);
    let response = match answer(state, store, line, &request_id).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let status = response.status();
    let body = match axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES).await {
        Ok(b) => serde_json::from_slice(&b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&b).into_owned())),
        Err(e) => {
            tracing::warn!(batch = %line.batch_id, line = line.line, "the line's answer broke off: {e}");
            json!({"error": {"message": "the answer broke off", "type": "server_error", "code": "server_error"}})
        }
    };
    let code = body.pointer("/error/code").and_then(Value::as_str);
    if refused_for_now(status, code) {
        return Ran::Later;
    }
    if failed_on_our_side(status, code) && line.retries < MAX_RETRIES {
        tracing::warn!(batch = %line.batch_id, line = line.line, retries = line.retries, "the engine failed the line ({status}); it runs again");
        return Ran::Again;
    }
    let ok = status.is_success() && body.get("error").is_none();
    let error = (!ok).then(|| {
        let e = body.get("error");
        let field = |k: &str| e.and_then(|e| e.get(k)).and_then(Value::as_str);
        json!({
            "code": field("code").or_else(|| field("type")).unwrap_or("server_error"),
            "message": field("message").unwrap_or("the request failed"),
        })
    });
    let usage = if ok {
        usage_of(&body)
    } else {
        BatchUsage::default()
    };
    let result = json!({
        "id": format!("batch_req_{}", request_id.replace('-', "")),
        "custom_id": line.custom_id,
        "response": {"status_code": status.as_u16(), "request_id": request_id, "body": body},
        "error": error,
    });
    Ran::Done(LineResult {
        state: if ok {
            LineState::Completed
        } else {
            LineState::Failed
        },
        result: result.to_string(),
        usage,
    })
}

/// The endpoint's answer to the line, as the direct request's.
async fn answer(
    state: &AppState,
    store: &Store,
    line: &ClaimedLine,
    request_id: &str,
) -> Result<Response, ApiError> {
    let batch = store
        .batch_by_id(&line.batch_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {}", line.batch_id)))?;
    let key_id = batch.key_id.as_deref().ok_or_else(|| {
        ApiError::InvalidApiKey("the batch was created before batches ran; create it again".into())
    })?;
    let mut caller = state.auth.caller_of_key(store, key_id).await?;
    caller.batch_id = Some(batch.id.clone());
    let id = RequestId(request_id.to_string(), Instant::now());
    let (state, body) = (State(state.clone()), line.body.as_bytes());
    match batch.endpoint {
        Endpoint::ChatCompletions => {
            let request = ApiJson(parse_json(body)?);
            completions::chat_completions(state, Extension(id), Extension(caller), request).await
        }
        Endpoint::Completions => {
            let request = ApiJson(parse_json(body)?);
            completions::completions(state, Extension(id), Extension(caller), request).await
        }
        Endpoint::Responses => {
            let raw = serde_json::from_slice(body)
                .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}"), None))?;
            let request = ApiJsonValue(parse_json(body)?, raw);
            responses::create(state, Extension(id), Extension(caller), request).await
        }
    }
}

/// The tokens of an answer: chat and text completions' `usage` or the Responses API's.
fn usage_of(body: &Value) -> BatchUsage {
    let usage = body.get("usage");
    let int = |path: &[&str]| {
        path.iter()
            .try_fold(usage?, |v, k| v.get(k))
            .and_then(Value::as_i64)
    };
    BatchUsage {
        input_tokens: int(&["prompt_tokens"])
            .or_else(|| int(&["input_tokens"]))
            .unwrap_or(0),
        output_tokens: int(&["completion_tokens"])
            .or_else(|| int(&["output_tokens"]))
            .unwrap_or(0),
        cached_tokens: int(&["prompt_tokens_details", "cached_tokens"])
            .or_else(|| int(&["input_tokens_details", "cached_tokens"]))
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lines_request_id_is_its_batch_custom_id_and_retry_and_nothing_else() {
        let a = request_id("batch_1", "req-1", 0);
        assert_eq!(a, request_id("batch_1", "req-1", 0));
        assert_ne!(a, request_id("batch_1", "req-2", 0));
        assert_ne!(a, request_id("batch_2", "req-1", 0));
        let retried = request_id("batch_1", "req-1", 1);
        assert_ne!(a, retried);
        assert_eq!(retried, request_id("batch_1", "req-1", 1));
        assert_ne!(retried, request_id("batch_1", "req-1", 2));
        assert_eq!(
            uuid::Uuid::parse_str(&a).map(|u| u.get_version_num()),
            Ok(8)
        );
    }

    #[test]
    fn only_a_refusal_for_now_runs_again() {
        let (busy, limited) = (
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::TOO_MANY_REQUESTS,
        );
        assert!(refused_for_now(busy, Some("overloaded")));
        assert!(refused_for_now(limited, Some("rate_limit_exceeded")));
        assert!(refused_for_now(limited, Some("resource_unavailable")));
        assert!(!refused_for_now(limited, Some("insufficient_quota")));
        assert!(!refused_for_now(StatusCode::BAD_REQUEST, None));
        assert!(!refused_for_now(StatusCode::OK, None));
    }

    #[test]
    fn only_the_engines_failures_run_again_as_retries() {
        let (internal, gateway) = (StatusCode::INTERNAL_SERVER_ERROR, StatusCode::BAD_GATEWAY);
        assert!(failed_on_our_side(internal, None));
        assert!(failed_on_our_side(gateway, None));
        assert!(!failed_on_our_side(gateway, Some("upstream_credentials")));
        assert!(!failed_on_our_side(StatusCode::BAD_REQUEST, None));
        assert!(!failed_on_our_side(StatusCode::SERVICE_UNAVAILABLE, None));
        assert!(!failed_on_our_side(StatusCode::OK, None));
    }

    #[test]
    fn usage_is_read_from_either_shape() {
        let chat = json!({"usage": {"prompt_tokens": 7, "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 2}}});
        let responses = json!({"usage": {"input_tokens": 5, "output_tokens": 4}});
        assert_eq!(
            (usage_of(&chat), usage_of(&responses), usage_of(&json!({}))),
            (
                BatchUsage {
                    input_tokens: 7,
                    output_tokens: 3,
                    cached_tokens: 2
                },
                BatchUsage {
                    input_tokens: 5,
                    output_tokens: 4,
                    cached_tokens: 0
                },
                BatchUsage::default()
            )
        );
    }
}
