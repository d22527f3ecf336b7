//! `GET /v1/models` and `GET /v1/models/{id}`: the models this gateway serves.

use axum::extract::State;
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::admission::backend_for;
use crate::auth::Caller;
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

/// The models this gateway serves to the caller: the catalogue's and its customer's own LoRA
/// adapters (never another customer's).
#[utoipa::path(get, path = "/v1/models", tag = "public",
    responses((status = 200, body = ListModelsResponse), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn list_models(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<ListModelsResponse> {
    let data: Vec<Model> = state
        .catalogue
        .models_of(&caller.customer_id)
        .into_iter()
        .map(Model::from)
        .collect();
    Json(ListModelsResponse {
        object: "list",
        data,
    })
}

/// One model (404 for another customer's adapter, as for an unknown id).
#[utoipa::path(get, path = "/v1/models/{id}", tag = "public",
    params(("id" = String, Path)),
    responses((status = 200, body = Model), crate::openapi::PublicErrors),
    security(("api_key" = [])))]
pub async fn get_model(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Model>, ApiError> {
    let backend = backend_for(&state, &caller.customer_id, &id)?;
    Ok(Json(backend.info().into()))
}
