//! The OpenAPI 3.1 document of the public and admin APIs, served at `GET /openapi.json`.
//!
//! Generated with utoipa from the code's types: request bodies are the types the handlers
//! deserialize ([`crate::api::openai::ChatRequest`], [`crate::api::openai::CompletionRequest`],
//! the Responses API's `CreateResponse`, the Usage API's query), response bodies are the types
//! the handlers serialize (next to each handler; [`crate::error::ErrorResponse`] for errors).
//! Each operation is declared on its handler, with `#[utoipa::path]`; this module gathers them
//! (the admin ones through [`crate::api::admin::AdminApi`], next to the table that routes them
//! with their scopes); what the operations share is in [`crate::openapi`]. The tests below
//! check that every documented operation is routed (the admin module's, that every admin route
//! is documented) and that real responses validate, and CI's Schemathesis run
//! (`tests/python/test_openapi_fuzz.py`) fuzzes the server against it. It owns the document,
//! not the behaviour.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use crate::api;
use crate::error::ErrorResponse;
use crate::openapi::Security;

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
