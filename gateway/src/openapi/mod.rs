//! The OpenAPI 3.1 document of the public and admin APIs, served at `GET /openapi.json`.
//!
//! Generated with utoipa from the code's types: request bodies are the types the handlers
//! deserialize ([`crate::api::openai::ChatRequest`], [`crate::api::openai::CompletionRequest`], the
//! Responses API's `CreateResponse`, the Usage API's query), responses and admin bodies are the
//! typed shapes in [`schemas`] and [`admin_schemas`] (the handlers build theirs with `json!`).
//! The operations are declared here, one `#[utoipa::path]` per route, rather than on the
//! handlers, so the routers stay one concern and this file is the contract's single index; the
//! tests below check that every documented operation is routed and that real responses
//! validate, and CI's Schemathesis run (`tests/python/test_openapi_fuzz.py`) fuzzes the server
//! against it. It owns the document, not the behaviour.
//!
//! Component names follow OpenAI's (`CreateChatCompletionRequest`, `CompletionUsage`,
//! `Response`, ...), and only the fields the server implements are described.

pub mod admin_schemas;
pub mod schemas;

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi};

use admin_schemas as admin;
use schemas::ErrorResponse;

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

/// Declarations of the operations: each function stands for the route of the same path.
#[expect(
    dead_code,
    reason = "the functions exist only to carry their #[utoipa::path] declarations"
)]
mod paths {
    use super::admin;
    use super::schemas::*;
    use super::{AdminErrors, PublicErrors};
    use crate::api::openai::{ChatRequest, CompletionRequest};
    use crate::api::responses::request::CreateResponse;

    /// Creates a chat completion (`stream: true`: `chat.completion.chunk` server-sent events
    /// ending with `data: [DONE]`).
    #[utoipa::path(post, path = "/v1/chat/completions", tag = "public",
        request_body = ChatRequest,
        responses(
            (status = 200, description = "The completion, or its event stream",
             content((CreateChatCompletionResponse = "application/json"), (ServerSentEvent = "text/event-stream"))),
            PublicErrors),
        security(("api_key" = [])))]
    fn chat_completions() {}

    /// Creates a (legacy) text completion.
    #[utoipa::path(post, path = "/v1/completions", tag = "public",
        request_body = CompletionRequest,
        responses(
            (status = 200, description = "The completion, or its event stream",
             content((CreateCompletionResponse = "application/json"), (ServerSentEvent = "text/event-stream"))),
            PublicErrors),
        security(("api_key" = [])))]
    fn completions() {}

    /// Creates a model response (`stream: true`: typed `response.*` events).
    #[utoipa::path(post, path = "/v1/responses", tag = "public",
        request_body = CreateResponse,
        responses(
            (status = 200, description = "The response, or its event stream",
             content((Response = "application/json"), (ServerSentEvent = "text/event-stream"))),
            PublicErrors),
        security(("api_key" = [])))]
    fn create_response() {}

    /// A stored response of the caller's customer.
    #[utoipa::path(get, path = "/v1/responses/{id}", tag = "public",
        params(("id" = String, Path, description = "The response id (`resp_...`)")),
        responses((status = 200, body = Response), PublicErrors),
        security(("api_key" = [])))]
    fn get_response() {}

    /// Deletes a stored response of the caller's customer.
    #[utoipa::path(delete, path = "/v1/responses/{id}", tag = "public",
        params(("id" = String, Path, description = "The response id (`resp_...`)")),
        responses((status = 200, body = DeletedResponse), PublicErrors),
        security(("api_key" = [])))]
    fn delete_response() {}

    /// The input items of a stored response, newest first unless `order=asc`.
    #[utoipa::path(get, path = "/v1/responses/{id}/input_items", tag = "public",
        params(
            ("id" = String, Path, description = "The response id (`resp_...`)"),
            ("limit" = Option<u32>, Query, minimum = 1, maximum = 100),
            ("order" = Option<String>, Query, pattern = "^(asc|desc)$"),
            ("after" = Option<String>, Query, description = "An item id: list the items after it"),
        ),
        responses((status = 200, body = ResponseItemList), PublicErrors),
        security(("api_key" = [])))]
    fn input_items() {}

    /// The models this gateway serves.
    #[utoipa::path(get, path = "/v1/models", tag = "public",
        responses((status = 200, body = ListModelsResponse), PublicErrors),
        security(("api_key" = [])))]
    fn list_models() {}

    /// One model.
    #[utoipa::path(get, path = "/v1/models/{id}", tag = "public",
        params(("id" = String, Path)),
        responses((status = 200, body = Model), PublicErrors),
        security(("api_key" = [])))]
    fn get_model() {}

    /// The caller's customer's token usage in time buckets (OpenAI's Usage API).
    #[utoipa::path(get, path = "/v1/organization/usage/completions", tag = "public",
        params(
            ("start_time" = i64, Query, minimum = 0, description = "Unix seconds, inclusive"),
            ("end_time" = Option<i64>, Query, minimum = 0, description = "Unix seconds, exclusive"),
            ("bucket_width" = Option<String>, Query, pattern = "^(1m|1h|1d)$"),
            ("group_by" = Option<String>, Query, description = "Comma-separated: `model`, `api_key_id`"),
            ("limit" = Option<i64>, Query, minimum = 1, description = "Buckets per page"),
            ("page" = Option<String>, Query, description = "`next_page` of the previous page"),
        ),
        responses((status = 200, body = UsageResponse), PublicErrors),
        security(("api_key" = [])))]
    fn completions_usage() {}

    /// The caller's customer's costs in daily buckets (OpenAI's Costs API).
    #[utoipa::path(get, path = "/v1/organization/costs", tag = "public",
        params(
            ("start_time" = i64, Query, minimum = 0, description = "Unix seconds, inclusive"),
            ("end_time" = Option<i64>, Query, minimum = 0, description = "Unix seconds, exclusive"),
            ("bucket_width" = Option<String>, Query, pattern = "^1d$"),
            ("group_by" = Option<String>, Query, description = "`line_item`"),
            ("limit" = Option<i64>, Query, minimum = 1, description = "Buckets per page"),
            ("page" = Option<String>, Query, description = "`next_page` of the previous page"),
        ),
        responses((status = 200, body = CostsResponse), PublicErrors),
        security(("api_key" = [])))]
    fn costs() {}

    /// Liveness and each model's load.
    #[utoipa::path(get, path = "/health", tag = "operations",
        responses((status = 200, body = Health)))]
    fn health() {}

    /// Prometheus metrics (text exposition format).
    #[utoipa::path(get, path = "/metrics", tag = "operations",
        responses((status = 200, body = String, content_type = "text/plain")))]
    fn metrics() {}

    /// This document.
    #[utoipa::path(get, path = "/openapi.json", tag = "operations",
        responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
    fn openapi() {}

    #[utoipa::path(get, path = "/admin/v1/customers", tag = "admin",
        responses((status = 200, body = admin::CustomerList), AdminErrors),
        security(("admin_token" = [])))]
    fn list_customers() {}

    #[utoipa::path(post, path = "/admin/v1/customers", tag = "admin",
        request_body = admin::CreateCustomer,
        responses((status = 201, body = admin::Customer), AdminErrors),
        security(("admin_token" = [])))]
    fn create_customer() {}

    /// A customer with its spend in the current budget period.
    #[utoipa::path(get, path = "/admin/v1/customers/{id}", tag = "admin",
        params(("id" = String, Path)),
        responses((status = 200, body = admin::Customer), AdminErrors),
        security(("admin_token" = [])))]
    fn get_customer() {}

    #[utoipa::path(patch, path = "/admin/v1/customers/{id}", tag = "admin",
        params(("id" = String, Path)),
        request_body = admin::UpdateCustomer,
        responses((status = 200, body = admin::Customer), AdminErrors),
        security(("admin_token" = [])))]
    fn update_customer() {}

    /// A customer's keys, without their secrets.
    #[utoipa::path(get, path = "/admin/v1/customers/{id}/keys", tag = "admin",
        params(("id" = String, Path)),
        responses((status = 200, body = admin::ApiKeyList), AdminErrors),
        security(("admin_token" = [])))]
    fn list_keys() {}

    /// Issues a key; its secret is in this answer only.
    #[utoipa::path(post, path = "/admin/v1/customers/{id}/keys", tag = "admin",
        params(("id" = String, Path)),
        request_body = admin::CreateKey,
        responses((status = 201, body = admin::CreatedApiKey), AdminErrors),
        security(("admin_token" = [])))]
    fn create_key() {}

    /// A key (without its secret), with the customer it belongs to.
    #[utoipa::path(get, path = "/admin/v1/keys/{key_id}", tag = "admin",
        params(("key_id" = String, Path)),
        responses((status = 200, body = admin::ApiKey), AdminErrors),
        security(("admin_token" = [])))]
    fn get_key() {}

    /// Revokes a key at once.
    #[utoipa::path(delete, path = "/admin/v1/keys/{key_id}", tag = "admin",
        params(("key_id" = String, Path)),
        responses((status = 200, body = admin::ApiKey), AdminErrors),
        security(("admin_token" = [])))]
    fn revoke_key() {}

    /// Changes a key's limits, models, expiry, default tags or budget (`null` clears one).
    #[utoipa::path(patch, path = "/admin/v1/keys/{key_id}", tag = "admin",
        params(("key_id" = String, Path)),
        request_body = admin::UpdateKey,
        responses((status = 200, body = admin::ApiKey), AdminErrors),
        security(("admin_token" = [])))]
    fn update_key() {}

    /// Usage aggregates, as JSON or CSV.
    #[utoipa::path(get, path = "/admin/v1/usage", tag = "admin",
        params(
            ("start" = Option<String>, Query, description = "RFC 3339 or a date; default: the start of this UTC month"),
            ("end" = Option<String>, Query, description = "RFC 3339 or a date; default: now"),
            ("customer_id" = Option<String>, Query),
            ("model" = Option<String>, Query),
            ("tag" = Option<String>, Query, description = "`key:value`"),
            ("group_by" = Option<String>, Query, description = "Comma-separated: customer, model, key, day, tag:KEY"),
            ("format" = Option<String>, Query, pattern = "^(json|csv)$"),
        ),
        responses(
            (status = 200, description = "One row per group",
             content((admin::UsageReport = "application/json"), (String = "text/csv"))),
            AdminErrors),
        security(("admin_token" = [])))]
    fn usage() {}

    /// Usage records in ledger order, for export jobs that consume incrementally.
    #[utoipa::path(get, path = "/admin/v1/usage/records", tag = "admin",
        params(
            ("after" = Option<String>, Query, description = "A `next_cursor`"),
            ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000),
            ("customer_id" = Option<String>, Query, description = "Only this customer's records"),
            ("key_id" = Option<String>, Query, description = "Only this key's records"),
            ("model" = Option<String>, Query, description = "Only this model's records"),
            ("status" = Option<String>, Query, description = "Only records that ended so: `completed`, `cancelled`, `failed`"),
            ("start" = Option<String>, Query, description = "Records started at or after this time (RFC 3339 or a date)"),
            ("end" = Option<String>, Query, description = "Records started before this time (RFC 3339 or a date)"),
        ),
        responses((status = 200, body = admin::UsageRecordPage), AdminErrors),
        security(("admin_token" = [])))]
    fn usage_records() {}

    /// A customer's invoice for a month.
    #[utoipa::path(get, path = "/admin/v1/invoices/{customer_id}", tag = "admin",
        params(
            ("customer_id" = String, Path),
            ("period" = Option<String>, Query, pattern = "^[0-9]{4}-[0-9]{2}$", description = "YYYY-MM; default: this month"),
            ("tag" = Option<String>, Query, description = "`key:value`"),
            ("group_by" = Option<String>, Query, description = "`tag:KEY`"),
        ),
        responses((status = 200, body = admin::Invoice), AdminErrors),
        security(("admin_token" = [])))]
    fn invoice() {}

    /// Admin tokens (scope `admin`), without their secrets.
    #[utoipa::path(get, path = "/admin/v1/admin_tokens", tag = "admin",
        responses((status = 200, body = admin::AdminTokenList), AdminErrors),
        security(("admin_token" = [])))]
    fn list_admin_tokens() {}

    /// Issues a scoped admin token; its secret is in this answer only.
    #[utoipa::path(post, path = "/admin/v1/admin_tokens", tag = "admin",
        request_body = admin::CreateAdminToken,
        responses((status = 201, body = admin::CreatedAdminToken), AdminErrors),
        security(("admin_token" = [])))]
    fn create_admin_token() {}

    /// Revokes an admin token at once.
    #[utoipa::path(delete, path = "/admin/v1/admin_tokens/{id}", tag = "admin",
        params(("id" = String, Path)),
        responses((status = 200, body = admin::AdminToken), AdminErrors),
        security(("admin_token" = [])))]
    fn revoke_admin_token() {}

    /// A customer's budget-alert settings.
    #[utoipa::path(get, path = "/admin/v1/customers/{id}/alerts", tag = "admin",
        params(("id" = String, Path)),
        responses((status = 200, body = admin::AlertSettings), AdminErrors),
        security(("admin_token" = [])))]
    fn get_alert_settings() {}

    /// Sets the webhook and thresholds; a new signing secret is in this answer only.
    #[utoipa::path(put, path = "/admin/v1/customers/{id}/alerts", tag = "admin",
        params(("id" = String, Path)),
        request_body = admin::PutAlertSettings,
        responses((status = 200, body = admin::AlertSettings), AdminErrors),
        security(("admin_token" = [])))]
    fn put_alert_settings() {}

    /// Budget alerts, oldest first, with their webhook delivery.
    #[utoipa::path(get, path = "/admin/v1/alerts", tag = "admin",
        params(
            ("customer_id" = Option<String>, Query),
            ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000),
        ),
        responses((status = 200, body = admin::BudgetAlertList), AdminErrors),
        security(("admin_token" = [])))]
    fn list_alerts() {}

    /// The audit log of admin changes, oldest first, for export jobs that consume
    /// incrementally.
    #[utoipa::path(get, path = "/admin/v1/audit", tag = "admin",
        params(
            ("after" = Option<String>, Query, description = "A `next_cursor`"),
            ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000),
        ),
        responses((status = 200, body = admin::AuditPage), AdminErrors),
        security(("admin_token" = [])))]
    fn audit() {}
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
        paths::chat_completions,
        paths::completions,
        paths::create_response,
        paths::get_response,
        paths::delete_response,
        paths::input_items,
        paths::list_models,
        paths::get_model,
        paths::completions_usage,
        paths::costs,
        paths::health,
        paths::metrics,
        paths::openapi,
        paths::list_customers,
        paths::create_customer,
        paths::get_customer,
        paths::update_customer,
        paths::list_keys,
        paths::create_key,
        paths::get_key,
        paths::revoke_key,
        paths::update_key,
        paths::usage,
        paths::usage_records,
        paths::invoice,
        paths::list_admin_tokens,
        paths::create_admin_token,
        paths::revoke_admin_token,
        paths::get_alert_settings,
        paths::put_alert_settings,
        paths::list_alerts,
        paths::audit,
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
        doc.info.version = env!("CARGO_PKG_VERSION").to_string();
        doc.to_pretty_json().unwrap_or_else(|e| {
            tracing::error!("the OpenAPI document does not serialize: {e}");
            "{}".to_string()
        })
    });
    &DOC
}

/// `GET /openapi.json`.
pub async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document()).into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
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
