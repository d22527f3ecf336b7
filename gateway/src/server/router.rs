//! The routers: which path goes to which handler in [`crate::api`], behind which layers (the key
//! check, idempotency, the admin token), and the fallbacks. One router when everything shares a
//! listener ([`app`]), or a public and an operators' one ([`public_app`], [`operator_app`]).

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::{
    admin, batches, completions, document, files, health, models, responses, usage_api,
};
use crate::error::{ApiError, BodyLimit};
use crate::server::middleware::{observe, request_id};
use crate::server::shed::{self, Shed};
use crate::{auth, console, idempotency, AppState};

/// The router: `/v1` (authenticated), `/health`, `/metrics`, and `/admin` with an admin token.
pub fn app(state: AppState) -> Router {
    let router = v1(&state).merge(operator_routes(&state));
    finish(router, state)
}

/// The public router when the operator endpoints have a listener of their own: `/v1` and
/// `/health`.
pub fn public_app(state: AppState) -> Router {
    let router = v1(&state)
        .route("/health", get(health::health))
        .route("/openapi.json", get(document::openapi_json));
    finish(router, state)
}

/// The operators' router: `/admin` (with an admin token), `/metrics` and `/health`.
pub fn operator_app(state: AppState) -> Router {
    let router = operator_routes(&state);
    finish(router, state)
}

/// `/admin` (with an admin token), `/metrics` and `/health`.
fn operator_routes(state: &AppState) -> Router<AppState> {
    let mut router = Router::new()
        .route("/health", get(health::health))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(document::openapi_json));
    if state.admin_token.is_some() {
        router = router
            .merge(admin::router(state.clone()))
            .merge(console::router(state.clone()));
    }
    router
}

/// The OpenAI API, behind the key check.
fn v1(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::create))
        // Inside the key check (set below): it needs the customer.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .route(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route(
            "/v1/responses/{id}/cancel",
            post(responses::background::cancel),
        )
        .route(
            "/v1/files",
            // The upload streams its body (oversize.rs lets it through) within its own limits.
            post(files::upload::create)
                .layer(DefaultBodyLimit::disable())
                .get(files::list),
        )
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{id}", get(models::get_model))
        .route(
            "/v1/organization/usage/completions",
            get(usage_api::completions_usage),
        )
        .route("/v1/organization/costs", get(usage_api::costs))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::middleware::require_key,
        ))
        // Outside the key check: a shed request costs no lookup.
        .route_layer(middleware::from_fn_with_state(
            Shed::new(
                state.config.server.max_inflight_requests,
                state.metrics.requests_shed.clone(),
            ),
            shed::layer,
        ))
}

/// Fallbacks, body limit, metrics and request ids around `router`.
fn finish(router: Router<AppState>, state: AppState) -> Router {
    let limit = state.config.server.max_body_bytes;
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(move |request, next| {
            super::oversize::read_body_first(limit, request, next)
        }))
        .layer(axum::Extension(BodyLimit(limit)))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let mut r = ApiError::invalid(
        format!("method {method} is not allowed on {}", uri.path()),
        None,
    )
    .into_response();
    *r.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    r
}
