//! `GET /v1/models` and `GET /v1/models/{id}`: the models this gateway serves.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::admission::backend_for;
use crate::error::{ApiError, ApiPath};
use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    #[schema(value_type = String, pattern = "^model$")]
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListModelsResponse {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<Model>,
}

impl From<crate::backend::ModelInfo> for Model {
    fn from(info: crate::backend::ModelInfo) -> Self {
        Self {
            id: info.id,
            object: "model",
            created: info.created,
            owned_by: info.owned_by,
        }
    }
}

/// The models this gateway serves.
#[utoipa::path(get, path = "/v1/models", tag = "public",
    responses((status = 200, body = ListModelsResponse), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn list_models(State(state): State<AppState>) -> Json<ListModelsResponse> {
    let catalogue = state.catalogue.current();
    let mut data: Vec<Model> = catalogue
        .backends
        .values()
        .map(|b| b.info().into())
        .collect();
    data.sort_by(|a, b| a.id.cmp(&b.id));
    Json(ListModelsResponse {
        object: "list",
        data,
    })
}

/// One model.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "public",
    params(("id" = String, Path)),
    responses((status = 200, body = Model), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn get_model(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Model>, ApiError> {
    let backend = backend_for(&state, &id)?;
    Ok(Json(backend.info().into()))
}
