//! The gateway's error type and how each error looks to a client: OpenAI's
//! `{"error":{"message","type","param","code"}}` with OpenAI's status codes. 5xx bodies stay
//! generic; their detail goes to the logs only.
//!
//! Also [`ApiJson`], a JSON extractor whose every rejection (malformed JSON, wrong types, body
//! too large, wrong content type) is an [`ApiError`].

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use crate::backend::BackendError;

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
    pub kind: &'static str,
    #[schema(required)]
    pub param: Option<String>,
    #[schema(required)]
    pub code: Option<&'static str>,
}

/// Everything a request can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("{0}")]
    InvalidApiKey(String),
    #[error("the model `{0}` does not exist or you do not have access to it")]
    ModelNotFound(String),
    #[error("unknown route {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the model is overloaded; retry after {retry_after_secs} seconds")]
    Overloaded { retry_after_secs: u64 },
    /// The model is loading and its queue of waiting requests is full.
    #[error("the model is loading; retry after {retry_after_secs} seconds")]
    ModelLoading { retry_after_secs: u64 },
    /// The gateway serves `max_inflight_requests` already.
    #[error("the server is at capacity; retry after {retry_after_secs} seconds")]
    AtCapacity { retry_after_secs: u64 },
    /// The key may not use this model.
    #[error("this API key is not allowed to use the model `{0}`")]
    ModelNotAllowed(String),
    /// The caller may not ask for this value of `param` (`service_tier: "priority"` without
    /// the permission).
    #[error("{message}")]
    PermissionDenied {
        message: String,
        param: &'static str,
    },
    /// A `flex` request found no capacity within the model's `flex_max_wait_secs`: never
    /// started, never billed; worth a retry later.
    #[error("no capacity for service_tier `flex` right now; retry after {retry_after_secs} seconds or use service_tier `default`")]
    ResourceUnavailable { retry_after_secs: u64 },
    /// A per-minute limit (`unit` is `requests` or `tokens`).
    #[error("{message}")]
    RateLimited {
        message: String,
        unit: &'static str,
        retry_after_secs: u64,
    },
    /// The customer's budget for the period is used up.
    #[error("{message}")]
    InsufficientQuota {
        message: String,
        retry_after_secs: u64,
    },
    /// A dependency (the database) is unreachable and the request cannot be served safely.
    #[error("{0}")]
    Unavailable(String),
    /// Admin API: the object exists already.
    #[error("{0}")]
    Conflict(String),
    /// An `Idempotency-Key` already used by this customer for another request body.
    #[error("{0}")]
    IdempotencyKeyReused(String),
    /// An `Idempotency-Key` whose first request is still running; retry after a moment.
    #[error("{0}")]
    IdempotencyKeyInProgress(String),
    /// Admin API: no such object.
    #[error("{0}")]
    NotFound(String),
    /// Admin API: missing or wrong admin token (401; a valid token without the scope is
    /// [`ApiError::InsufficientScope`], 403).
    #[error("{0}")]
    InvalidAdminToken(String),
    /// Admin API: the token is valid but its scopes do not cover the operation.
    #[error("{0}")]
    InsufficientScope(String),
    /// The model's server failed mid-answer (a worker that died); the detail goes to logs.
    #[error("the model's server failed while answering; retry the request")]
    BadGateway(String),
    /// The model's server refused this gateway's own credentials for it; the detail goes to
    /// logs.
    #[error("the model's server is misconfigured (it refused this gateway's credentials); the operator has been alerted in the logs")]
    UpstreamCredentials(String),
    /// The model's server refused the request with a client error, passed on with its status.
    #[error("{message}")]
    UpstreamRefused {
        status: u16,
        message: String,
        param: Option<String>,
    },
    /// A LoRA adapter of the model cannot be loaded (its files are missing, malformed, or
    /// shaped for another model); the detail goes to logs.
    #[error(
        "the model's LoRA adapter cannot be loaded; the operator has been alerted in the logs"
    )]
    AdapterUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<&'static str>>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: param.into().map(str::to_string),
        }
    }

    /// HTTP status, OpenAI `type`, `code`.
    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        let (kind, code) = self.kind_and_code();
        (self.status(), kind, code)
    }

    /// The HTTP status of each error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::InvalidApiKey(_) => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded { .. } | Self::AtCapacity { .. } | Self::ModelLoading { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) | Self::AdapterUnavailable(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamCredentials(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamRefused { status, .. } => StatusCode::from_u16(*status)
                .ok()
                .filter(StatusCode::is_client_error)
                .unwrap_or(StatusCode::BAD_REQUEST),
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::PermissionDenied { .. } => StatusCode::FORBIDDEN,
            Self::ResourceUnavailable { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::InsufficientQuota { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::IdempotencyKeyReused(_) => StatusCode::CONFLICT,
            Self::IdempotencyKeyInProgress(_) => StatusCode::CONFLICT,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::InvalidAdminToken(_) => StatusCode::UNAUTHORIZED,
            Self::InsufficientScope(_) => StatusCode::FORBIDDEN,
        }
    }

    /// OpenAI's `type` and `code` of each error.
    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::InvalidRequest { .. } => ("invalid_request_error", None),
            Self::InvalidApiKey(_) => ("invalid_request_error", Some("invalid_api_key")),
            Self::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            Self::RouteNotFound { .. } => ("invalid_request_error", Some("unknown_url")),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", Some("request_too_large")),
            Self::Overloaded { .. } | Self::AtCapacity { .. } => {
                ("server_error", Some("overloaded"))
            }
            Self::ModelLoading { .. } => ("server_error", Some("model_loading")),
            Self::Internal(_) => ("server_error", None),
            Self::AdapterUnavailable(_) => ("server_error", Some("adapter_unavailable")),
            Self::BadGateway(_) => ("server_error", None),
            Self::UpstreamCredentials(_) => ("server_error", Some("upstream_credentials")),
            Self::UpstreamRefused { .. } => ("invalid_request_error", None),
            Self::ModelNotAllowed(_) => ("invalid_request_error", Some("model_not_allowed")),
            Self::PermissionDenied { .. } => ("permission_error", Some("permission_denied")),
            Self::ResourceUnavailable { .. } => ("server_error", Some("resource_unavailable")),
            Self::RateLimited { unit, .. } => (unit, Some("rate_limit_exceeded")),
            Self::InsufficientQuota { .. } => ("insufficient_quota", Some("insufficient_quota")),
            Self::Unavailable(_) => ("server_error", Some("service_unavailable")),
            Self::Conflict(_) => ("invalid_request_error", Some("conflict")),
            Self::IdempotencyKeyReused(_) => {
                ("invalid_request_error", Some("idempotency_key_reused"))
            }
            Self::IdempotencyKeyInProgress(_) => {
                ("invalid_request_error", Some("idempotency_key_in_progress"))
            }
            Self::NotFound(_) => ("invalid_request_error", Some("not_found")),
            Self::InvalidAdminToken(_) => ("invalid_request_error", Some("invalid_admin_token")),
            Self::InsufficientScope(_) => ("invalid_request_error", Some("insufficient_scope")),
        }
    }

    /// The JSON body (also used for SSE error events).
    pub fn body(&self) -> ErrorResponse {
        let (_, kind, code) = self.parts();
        let (message, param) = match self {
            Self::InvalidRequest { message, param }
            | Self::UpstreamRefused { message, param, .. } => (message.clone(), param.clone()),
            Self::ModelNotFound(_) | Self::ModelNotAllowed(_) => {
                (self.to_string(), Some("model".to_string()))
            }
            Self::PermissionDenied { message, param } => {
                (message.clone(), Some((*param).to_string()))
            }
            Self::Internal(detail) => {
                tracing::error!(detail = %detail, "internal error");
                (
                    "the server had an error while processing your request".to_string(),
                    None,
                )
            }
            Self::AdapterUnavailable(detail) => {
                tracing::error!(detail = %detail, "a LoRA adapter cannot be loaded");
                (self.to_string(), Some("model".to_string()))
            }
            other => (other.to_string(), None),
        };
        ErrorResponse {
            error: ErrorObject {
                message,
                kind,
                param,
                code,
            },
        }
    }
}

impl From<tollgate_metering::store::StoreError> for ApiError {
    fn from(e: tollgate_metering::store::StoreError) -> Self {
        use tollgate_metering::store::StoreError;
        match e {
            StoreError::Conflict(m) => Self::Conflict(m),
            StoreError::NotFound(m) => Self::NotFound(m),
            StoreError::Invalid(m) => Self::InvalidRequest {
                message: m,
                param: None,
            },
            // A dropped connection or an unreachable database is worth a retry; the detail
            // goes to the log, the client is told to come back.
            other if other.is_unreachable() => {
                tracing::error!(error = %other, "database unavailable");
                Self::Unavailable("the database is unavailable right now; retry shortly".into())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<tollgate_metering::limits::Refusal> for ApiError {
    fn from(r: tollgate_metering::limits::Refusal) -> Self {
        use tollgate_metering::limits::Refusal;
        // Whole seconds, rounded up, at least 1.
        let secs = |d: std::time::Duration| (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1);
        match r {
            Refusal::Rate {
                message,
                unit,
                retry_after,
            } => Self::RateLimited {
                message,
                unit,
                retry_after_secs: secs(retry_after),
            },
            Refusal::Quota {
                message,
                retry_after,
            } => Self::InsufficientQuota {
                message,
                retry_after_secs: secs(retry_after),
            },
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::InvalidRequest { message, param } => {
                Self::InvalidRequest { message, param }
            }
            BackendError::Overloaded { retry_after_secs } => Self::Overloaded { retry_after_secs },
            BackendError::Loading { retry_after_secs } => Self::ModelLoading { retry_after_secs },
            BackendError::NoCapacity { retry_after_secs } => {
                Self::ResourceUnavailable { retry_after_secs }
            }
            BackendError::Internal(detail) => Self::Internal(detail),
            BackendError::Adapter(detail) => Self::AdapterUnavailable(detail),
            BackendError::Broken(detail) => {
                tracing::error!("{detail}");
                Self::BadGateway(detail)
            }
            BackendError::Credentials(detail) => {
                tracing::error!(
                    "{detail} (check the backend's api_key_env: the upstream refused the key)"
                );
                Self::UpstreamCredentials(detail)
            }
            BackendError::Refused {
                status,
                message,
                param,
            } => Self::UpstreamRefused {
                status,
                message,
                param,
            },
            BackendError::Unavailable(detail) => {
                tracing::error!("{detail}");
                Self::Unavailable(
                    "no server of this model is available right now; retry shortly".into(),
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Self::Overloaded { retry_after_secs }
        | Self::AtCapacity { retry_after_secs }
        | Self::ModelLoading { retry_after_secs }
        | Self::ResourceUnavailable { retry_after_secs }
        | Self::RateLimited {
            retry_after_secs, ..
        }
        | Self::InsufficientQuota {
            retry_after_secs, ..
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        } else if let Self::Unavailable(_) = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        }
        // OpenAI's SDKs retry a 409 unless told otherwise: a key in progress is worth
        // retrying (the retry gets the stored result), a key reused for another body is not.
        match self {
            Self::IdempotencyKeyInProgress(_) => {
                let headers = response.headers_mut();
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
                headers.insert("x-should-retry", HeaderValue::from_static("true"));
            }
            Self::IdempotencyKeyReused(_) => {
                response
                    .headers_mut()
                    .insert("x-should-retry", HeaderValue::from_static("false"));
            }
            _ => {}
        }
        response
    }
}

/// A JSON body whose rejections are OpenAI-shaped errors, with `param` naming the field when
/// the problem is a field's type.
pub struct ApiJson<T>(pub T);

/// A request body type. serde cannot tell where an error is inside a `#[serde(flatten)]`ed
/// part, so a body with one re-reads that part on its own to name the field.
pub trait RequestBody: DeserializeOwned {
    /// The top-level fields the server reads. When not empty, any other field with a value
    /// other than `null` is refused (400, `param` naming it), as OpenAI refuses an argument it
    /// does not recognise: a field the server would not honour is never ignored silently.
    const FIELDS: &'static [&'static str] = &[];

    /// Deserializes the flattened part of `body` alone, with path tracking.
    fn check_flattened(_body: &[u8]) -> Result<(), serde_path_to_error::Error<serde_json::Error>> {
        Ok(())
    }
}

/// OpenAI arguments accepted when they ask for what the server does anyway.
fn is_default_argument(field: &str, value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (field, value) {
        ("store", Value::Bool(false)) => true,
        ("modalities", Value::Array(m)) => m.iter().all(|x| x == "text"),
        _ => false,
    }
}

/// The first top-level field of `bytes` outside `known` that asks for something.
fn unrecognized(bytes: &[u8], known: &[&str]) -> Option<String> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes).ok()?;
    map.into_iter()
        .find(|(k, v)| !v.is_null() && !known.contains(&k.as_str()) && !is_default_argument(k, v))
        .map(|(k, _)| k)
}

/// `(message, param)` of a body that failed to deserialize.
fn describe(e: serde_path_to_error::Error<serde_json::Error>) -> (String, Option<String>) {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let message = if inner.is_syntax() || inner.is_eof() {
        format!("we could not parse the JSON body of your request: {inner}")
    } else if path == "." {
        format!("invalid request body: {inner}")
    } else {
        format!("invalid value for `{path}`: {inner}")
    };
    let param = (path != ".").then_some(path);
    (message, param)
}

/// The body of a JSON request: refused unless its content type is JSON, within the body
/// limit.
async fn json_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"));
    if !is_json {
        return Err(ApiError::invalid(
            "expected a JSON body with `Content-Type: application/json`",
            None,
        ));
    }
    ApiBytes::from_request(req, state).await.map(|b| b.0)
}

/// The body limit in force, in every request's extensions (the router puts it there), for
/// the 413 message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimit(pub usize);

/// The raw body, within the body limit, its rejections OpenAI-shaped (413 past the limit).
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
        Bytes::from_request(req, state)
            .await
            .map(Self)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit }
                } else {
                    ApiError::invalid(format!("cannot read the request body: {rejection}"), None)
                }
            })
    }
}

/// Path parameters, their rejections OpenAI-shaped (a segment that is not UTF-8 once
/// percent-decoded is a 400 naming the parameter, not axum's plain text).
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                let param = match e.kind() {
                    ErrorKind::InvalidUtf8InPathParam { key }
                    | ErrorKind::ParseErrorAtKey { key, .. } => Some(key.clone()),
                    _ => None,
                };
                Err(ApiError::InvalidRequest {
                    message: format!("invalid path: {}", e.body_text()),
                    param,
                })
            }
            Err(other) => Err(ApiError::invalid(format!("invalid path: {other}"), None)),
        }
    }
}

/// A query string, or a 400 naming what is wrong with it.
pub(crate) fn query<T: serde::de::DeserializeOwned>(
    q: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|axum::extract::Query(q)| q)
        .map_err(|e| ApiError::invalid(format!("invalid query: {}", e.body_text()), None))
}

/// A JSON object already read (the admin API's bodies) as a `T`, with `param` naming the field
/// that does not fit.
pub(crate) fn from_object<T: DeserializeOwned>(
    object: serde_json::Map<String, serde_json::Value>,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(serde_json::Value::Object(object)).map_err(|e| {
        let (message, param) = describe(e);
        ApiError::InvalidRequest { message, param }
    })
}

/// `bytes` as a `T`, with `param` naming the field that does not fit.
pub(crate) fn parse_json<T: RequestBody>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(de) {
        Ok(value) => match unrecognized(bytes, T::FIELDS).filter(|_| !T::FIELDS.is_empty()) {
            Some(field) => Err(ApiError::InvalidRequest {
                message: format!(
                    "Unrecognized request argument supplied: {field} (this server does not support it)"
                ),
                param: Some(field),
            }),
            None => Ok(value),
        },
        Err(e) => {
            let located = e.path().to_string() != "." || e.inner().is_syntax();
            let e = match T::check_flattened(bytes) {
                Err(flattened) if !located => flattened,
                _ => e,
            };
            let (message, param) = describe(e);
            Err(ApiError::InvalidRequest { message, param })
        }
    }
}

impl<T: RequestBody, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_bytes(req, state).await?;
        Ok(Self(parse_json(&bytes)?))
    }
}

/// [`ApiJson`] that also keeps the body as a JSON value (for requests passed on as sent).
pub struct ApiJsonValue<T>(pub T, pub serde_json::Value);

impl<T: RequestBody, S: Send + Sync> FromRequest<S> for ApiJsonValue<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = json_bytes(req, state).await?;
        let typed = parse_json(&bytes)?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}"), None))?;
        Ok(Self(typed, value))
    }
}
