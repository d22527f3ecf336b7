//! `GET /health` (liveness and each model's load) and `GET /metrics` (Prometheus text).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::backend::adapter_keys;
use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelLoad {
    pub id: String,
    pub running: u64,
    pub waiting: u64,
    pub kv_cache_used_bytes: u64,
    pub kv_cache_capacity_bytes: u64,
    /// The LoRA adapters loaded beside the model's engine, as keys (`path:` and 16 hex digits
    /// of the SHA-256 of the adapter's directory; `name:<name>` too for the server's own
    /// adapters): gateways prefer a worker that holds a request's adapter.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<String>,
}

/// `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(value_type = String)]
    pub status: &'static str,
    pub models: Vec<ModelLoad>,
}

// Liveness and load: the server answers only once its models are loaded, and reports each
// model's running and waiting sequences and KV-cache use (gateways route on it).
/// Liveness and each model's load.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = Health)))]
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    let snapshot = state.catalogue.current();
    let mut models: Vec<ModelLoad> = snapshot
        .backends
        .iter()
        .map(|(id, b)| {
            let l = b.load();
            // The server's own adapters of this model, which gateways may name without files.
            let declared = snapshot.models.values().filter_map(|m| {
                let a = m.adapter.as_ref().filter(|a| a.base == *id)?;
                Some((a.name.as_str(), a.path.as_deref()?))
            });
            ModelLoad {
                id: id.clone(),
                running: l.running.into(),
                waiting: l.waiting.into(),
                kv_cache_used_bytes: l.kv_cache_used_bytes,
                kv_cache_capacity_bytes: l.kv_cache_capacity_bytes,
                adapters: adapter_keys(&b.loaded_adapters(), declared),
            }
        })
        .collect();
    models.sort_by(|a, b| a.id.cmp(&b.id));
    Json(Health {
        status: "ok",
        models,
    })
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
        state.metrics.render(&state.catalogue.current().backends),
    )
        .into_response()
}
