//! The check of every line of a batch's input file before the batch starts: JSON, a
//! `custom_id` unique in the file, `method` `POST`, `url` equal to the batch's endpoint, and
//! a body valid exactly as the direct request's would be (the same request types and the
//! same plan, the model served); `stream: true` is refused. A refused line is reported with its
//! line number.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use tollgate_metering::kinds::{Endpoint, ServiceTier};
use tollgate_metering::store::BatchLine;

use crate::api::admission::{backend_for, price_of};
use crate::api::openai::{ChatRequest, CompletionRequest};
use crate::api::responses::request::CreateResponse;
use crate::error::{parse_json, ApiError};
use crate::AppState;

/// The most errors a failed batch lists.
pub const MAX_ERRORS: usize = 1_000;

/// One refused line, as the batch's `errors` list shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LineError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// 1-based.
    pub line: Option<i64>,
}

impl LineError {
    fn new(line: i64, code: &str, message: impl Into<String>, param: Option<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            param,
            line: Some(line),
        }
    }
}

/// A line as the Batch API has it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    custom_id: String,
    method: String,
    url: String,
    body: serde_json::Value,
}

/// The lines of one input file, checked one by one.
pub struct Checker<'a> {
    state: &'a AppState,
    /// The batch's owner: its lines may name its own adapters.
    customer: &'a str,
    endpoint: Endpoint,
    seen: HashSet<String>,
    pub lines: Vec<BatchLine>,
    pub errors: Vec<LineError>,
}

impl<'a> Checker<'a> {
    pub fn new(state: &'a AppState, customer: &'a str, endpoint: Endpoint) -> Self {
        Self {
            state,
            customer,
            endpoint,
            seen: HashSet::new(),
            lines: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Checks line `line` (1-based) of the file; keeps it, or its error.
    pub fn line(&mut self, line: i64, text: &[u8]) {
        match self.check(line, text) {
            Ok(ok) => self.lines.push(ok),
            Err(e) if self.errors.len() < MAX_ERRORS => self.errors.push(e),
            Err(_) => {}
        }
    }

    fn check(&mut self, line: i64, text: &[u8]) -> Result<BatchLine, LineError> {
        let parsed: Line = serde_json::from_slice(text).map_err(|e| {
            LineError::new(line, "invalid_json_line", format!("line {line}: {e}"), None)
        })?;
        if parsed.method != "POST" {
            return Err(LineError::new(
                line,
                "invalid_method",
                format!("line {line}: method must be POST, not {}", parsed.method),
                Some("method".into()),
            ));
        }
        if parsed.url != self.endpoint.as_str() {
            return Err(LineError::new(
                line,
                "mismatched_url",
                format!(
                    "line {line}: url {} is not the batch's endpoint {}",
                    parsed.url, self.endpoint
                ),
                Some("url".into()),
            ));
        }
        let body = parsed.body.to_string();
        let model = self.body(&parsed.custom_id, body.as_bytes()).map_err(|e| {
            let err = e.body().error;
            LineError::new(
                line,
                "invalid_request",
                format!("line {line}: {}", err.message),
                err.param.map(|p| format!("body.{p}")),
            )
        })?;
        if !self.seen.insert(parsed.custom_id.clone()) {
            return Err(LineError::new(
                line,
                "duplicate_custom_id",
                format!(
                    "line {line}: custom_id {} is used by an earlier line",
                    parsed.custom_id
                ),
                Some("custom_id".into()),
            ));
        }
        Ok(BatchLine {
            line,
            custom_id: parsed.custom_id,
            body,
            model,
        })
    }

    /// The body, checked as the direct request's, and sold at the batch tier; its model.
    fn body(&self, custom_id: &str, body: &[u8]) -> Result<String, ApiError> {
        let max_n = self.state.config.server.max_n;
        let (stream, model) = match self.endpoint {
            Endpoint::ChatCompletions => {
                let r: ChatRequest = parse_json(body)?;
                let out = (r.common.stream, r.model.clone());
                r.common.tags()?;
                r.plan(custom_id, max_n)?;
                out
            }
            Endpoint::Completions => {
                let r: CompletionRequest = parse_json(body)?;
                let out = (r.common.stream, r.model.clone());
                r.common.tags()?;
                r.plan(custom_id, max_n)?;
                out
            }
            Endpoint::Responses => {
                let r: CreateResponse = parse_json(body)?;
                if r.previous_response_id.is_some() {
                    return Err(ApiError::invalid(
                        "previous_response_id is not supported in a batch",
                        "previous_response_id",
                    ));
                }
                crate::api::responses::tags_of(&r)?;
                r.plan(&[], custom_id, max_n)?;
                (r.stream, r.model.clone())
            }
        };
        if stream == Some(true) {
            return Err(ApiError::invalid(
                "stream is not supported in a batch",
                "stream",
            ));
        }
        backend_for(self.state, self.customer, &model)?;
        price_of(self.state, self.customer, &model, ServiceTier::Batch)?;
        Ok(model)
    }
}
