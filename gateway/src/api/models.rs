//! `GET /v1/models` and `GET /v1/models/{id}`: the models this gateway serves.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::api::admission::backend_for;
use crate::error::{ApiError, ApiPath};
use crate::AppState;

fn model_json(info: &crate::backend::ModelInfo) -> Value {
    json!({"id": info.id, "object": "model", "created": info.created, "owned_by": info.owned_by})
}

/// The models this gateway serves.
#[utoipa::path(get, path = "/v1/models", tag = "public",
    responses((status = 200, body = crate::openapi::schemas::ListModelsResponse), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let mut models: Vec<_> = state.backends.values().map(|b| b.info()).collect();
    models.sort_by(|a, b| a.id.cmp(&b.id));
    Json(json!({"object": "list", "data": models.iter().map(model_json).collect::<Vec<_>>()}))
}

/// One model.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "public",
    params(("id" = String, Path)),
    responses((status = 200, body = crate::openapi::schemas::Model), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn get_model(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let backend = backend_for(&state, &id)?;
    Ok(Json(model_json(&backend.info())))
}
