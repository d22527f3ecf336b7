//! What the OpenAPI 3.1 document of the public and admin APIs is made of besides the
//! handlers' own types: the error sets ([`PublicErrors`], [`AdminErrors`]), a streamed answer's
//! event ([`ServerSentEvent`]) and the bearer schemes. A leaf: the handlers name these in their
//! `#[utoipa::path]`s, and [`crate::api::document`] gathers the operations into the document
//! served at `GET /openapi.json`.
//!
//! Component names follow OpenAI's (`CreateChatCompletionRequest`, `CompletionUsage`,
//! `Response`, ...), and only the fields the server implements are described.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, ToSchema};

use crate::error::ErrorResponse;

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

/// The errors of the public API, in OpenAI's shape.
#[derive(IntoResponses)]
pub enum PublicErrors {
    /// A field out of range, malformed JSON, or something the server cannot honour; `param`
    /// names the field.
    #[response(status = 400)]
    BadRequest(ErrorResponse),
    /// Missing, unknown, expired or revoked API key.
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// The key may not use this model.
    #[response(status = 403)]
    Forbidden(ErrorResponse),
    /// No such model, response or route.
    #[response(status = 404)]
    NotFound(ErrorResponse),
    /// The same `Idempotency-Key` with a different body.
    #[response(status = 409)]
    Conflict(ErrorResponse),
    /// The body is larger than the server's limit.
    #[response(status = 413)]
    TooLarge(ErrorResponse),
    /// `rate_limit_exceeded` (requests, tokens or concurrent requests) or
    /// `insufficient_quota`; with `Retry-After`.
    #[response(status = 429)]
    TooMany(ErrorResponse),
    /// A generic server error (details go to the server's log).
    #[response(status = 500)]
    Internal(ErrorResponse),
    /// The model's server failed after it had begun answering (a worker that died).
    #[response(status = 502)]
    BadGateway(ErrorResponse),
    /// Overloaded or a dependency is down; with `Retry-After`.
    #[response(status = 503)]
    Unavailable(ErrorResponse),
}

/// The errors of the admin API.
#[derive(IntoResponses)]
pub enum AdminErrors {
    /// A malformed body or query; `param` names the field.
    #[response(status = 400)]
    BadRequest(ErrorResponse),
    /// Missing or wrong admin token.
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// The admin token's scopes do not cover this operation.
    #[response(status = 403)]
    Forbidden(ErrorResponse),
    /// No such customer, key or route.
    #[response(status = 404)]
    NotFound(ErrorResponse),
    /// The object exists already.
    #[response(status = 409)]
    Conflict(ErrorResponse),
    /// The body is larger than the server's limit.
    #[response(status = 413)]
    TooLarge(ErrorResponse),
    /// Too many failed admin authentications from this address; with `Retry-After`.
    #[response(status = 429)]
    TooMany(ErrorResponse),
    #[response(status = 500)]
    Internal(ErrorResponse),
    /// The gateway runs without a database.
    #[response(status = 503)]
    Unavailable(ErrorResponse),
}

/// The bearer schemes: client keys for `/v1`, admin tokens for `/admin`.
pub(crate) struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("api_key", "A customer's API key"),
            ("admin_token", "An admin token (or TOLLGATE_ADMIN_TOKEN)"),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}
