//! `GET /health` (liveness and each model's load) and `GET /metrics` (Prometheus text).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::AppState;

// Liveness and load: the server answers only once its models are loaded, and reports each
// model's running and waiting sequences and KV-cache use (gateways route on it).
/// Liveness and each model's load.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = crate::openapi::schemas::Health)))]
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let mut models: Vec<Value> = state
        .backends
        .iter()
        .map(|(id, b)| {
            let l = b.load();
            json!({
                "id": id,
                "running": l.running,
                "waiting": l.waiting,
                "kv_cache_used_bytes": l.kv_cache_used_bytes,
                "kv_cache_capacity_bytes": l.kv_cache_capacity_bytes,
            })
        })
        .collect();
    models.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Json(json!({"status": "ok", "models": models}))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(&state.backends),
    )
        .into_response()
}
