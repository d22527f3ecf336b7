//! The OpenAPI 3.1 document of the public and admin APIs, served at `GET /openapi.json`.
//!
//! Generated with utoipa from the code's types: request bodies are the types the handlers
//! deserialize ([`crate::api::openai::ChatRequest`], [`crate::api::openai::CompletionRequest`], the
//! Responses API's `CreateResponse`, the Usage API's query), response bodies are the types the
//! handlers serialize (next to each handler; [`crate::error::ErrorResponse`] for errors). The
//! admin bodies the admin handlers read field by field are described in [`admin_schemas`].
//! Each operation is declared on its handler, with `#[utoipa::path]`; this module gathers them
//! (the admin ones through [`crate::api::admin::AdminApi`], next to the table that routes them
//! with their scopes). The tests below check that every documented operation is routed (the
//! admin module's, that every admin route is documented) and that real responses validate, and
//! CI's Schemathesis run (`tests/python/test_openapi_fuzz.py`) fuzzes the server against it. It
//! owns the document, not the behaviour.
//!
//! Component names follow OpenAI's (`CreateChatCompletionRequest`, `CompletionUsage`,
//! `Response`, ...), and only the fields the server implements are described.

pub mod admin_schemas;

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use crate::api;
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
struct Security;

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

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tollgate",
        description = "An OpenAI-compatible inference gateway: the public API (OpenAI's shapes) and the operators' admin API."
    ),
    paths(
        api::completions::chat_completions,
        api::completions::completions,
        api::responses::create,
        api::responses::get,
        api::responses::delete,
        api::responses::input_items,
        api::responses::background::cancel,
        api::files::upload::create,
        api::files::list,
        api::files::retrieve,
        api::files::content,
        api::files::delete,
        api::batches::create,
        api::batches::retrieve,
        api::batches::list,
        api::batches::cancel,
        api::models::list_models,
        api::models::get_model,
        api::usage_api::completions_usage,
        api::usage_api::costs,
        api::health::health,
        api::health::metrics,
        openapi_json,
    ),
    components(schemas(ErrorResponse)),
    modifiers(&Security),
    tags(
        (name = "public", description = "OpenAI-compatible API (`Authorization: Bearer <key>`)"),
        (name = "admin", description = "Operators' API (`Authorization: Bearer <admin token>`)"),
        (name = "operations", description = "Probes, metrics and this document"),
    )
)]
struct ApiDoc;

/// The document as JSON, built once.
pub fn document() -> &'static str {
    static DOC: LazyLock<String> = LazyLock::new(|| {
        let mut doc = ApiDoc::openapi();
        doc.merge(api::admin::AdminApi::openapi());
        doc.info.version = env!("CARGO_PKG_VERSION").to_string();
        doc.to_pretty_json().unwrap_or_else(|e| {
            tracing::error!("the OpenAPI document does not serialize: {e}");
            "{}".to_string()
        })
    });
    &DOC
}

/// This document.
#[utoipa::path(get, operation_id = "openapi", path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document()).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use axum::body::Body;
    use axum::http::{Method, Request};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::document;

    fn doc() -> Value {
        serde_json::from_str(document()).unwrap()
    }

    /// Every `$ref` in `v`.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn is_openapi_3_1_and_every_reference_resolves() {
        let d = doc();
        assert!(d["openapi"].as_str().unwrap().starts_with("3.1"));
        let mut all = Vec::new();
        refs(&d, &mut all);
        assert!(all.len() > 20);
        for r in all {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(d["components"]["schemas"][name].is_object(), "dangling {r}");
        }
        let schemes = &d["components"]["securitySchemes"];
        assert_eq!(schemes["api_key"]["scheme"], "bearer");
        assert_eq!(schemes["admin_token"]["scheme"], "bearer");
    }

    /// The request bodies are the handlers' own types, under OpenAI's names, with the bounds
    /// the validation enforces.
    #[test]
    fn request_bodies_come_from_the_handlers_types() {
        let d = doc();
        let op = &d["paths"]["/v1/chat/completions"]["post"];
        assert_eq!(
            op["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/CreateChatCompletionRequest"
        );
        let schemas = &d["components"]["schemas"];
        let chat = serde_json::to_string(&schemas["CreateChatCompletionRequest"]).unwrap();
        for field in ["messages", "model", "tools", "response_format"] {
            assert!(chat.contains(&format!("\"{field}\"")), "{field} in {chat}");
        }
        let common = serde_json::to_string(&schemas["CommonParams"]).unwrap();
        assert!(common.contains("\"max_tokens\""), "{common}");
        assert_eq!(
            schemas["CommonParams"]["properties"]["temperature"]["maximum"],
            2.0
        );
        assert_eq!(schemas["CreateCustomer"]["additionalProperties"], false);
        assert_eq!(
            schemas["CreateCustomer"]["required"],
            serde_json::json!(["id"])
        );
    }

    /// Every documented operation is routed: none answers "unknown route" or "method not
    /// allowed".
    #[tokio::test]
    async fn every_documented_operation_is_routed() {
        let config = crate::config::Config::from_toml_str(
            "[models.m]\nsource = { path = \"unused.gguf\" }\nbackend = { type = \"http\", urls = [\"http://127.0.0.1:9\"] }\n",
            std::path::Path::new("."),
        )
        .unwrap();
        let state = crate::AppState::new(
            config,
            HashMap::new(),
            crate::auth::AuthConfig::from_keys(["k"]),
        )
        .unwrap()
        .with_admin_token(Some("t".into()));
        let app = crate::app(state);
        let d = doc();
        let mut checked = 0;
        for (path, ops) in d["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                let uri = path.replace('{', "x").replace('}', "");
                let token = if path.starts_with("/admin") { "t" } else { "k" };
                let request = Request::builder()
                    .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
                    .uri(&uri)
                    .header("authorization", format!("Bearer {token}"))
                    .header("content-type", "application/json")
                    .body(Body::from("{}"))
                    .unwrap();
                let response = app.clone().oneshot(request).await.unwrap();
                let status = response.status().as_u16();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .unwrap();
                let text = String::from_utf8_lossy(&body);
                assert_ne!(status, 405, "{method} {path}: {text}");
                assert!(!text.contains("unknown_url"), "{method} {path}: {text}");
                checked += 1;
            }
        }
        assert!(checked >= 31, "{checked} operations");
    }
}
