//! A customer's LoRA adapters: `/admin/v1/customers/{id}/adapters` (register, list) and
//! `/admin/v1/customers/{id}/adapters/{name}` (remove). A registered adapter is the model id
//! `<base_model>:<name>` for that customer's keys only (`crate::catalogue`), billed at the
//! base model's prices, its records naming the base model and the adapter.
//!
//! Registering checks what a request would meet later, so a bad adapter is a 400 naming the
//! problem now rather than a server error on its first request: the base model is a local
//! model of the catalogue, the name a valid id, the path a local directory holding a PEFT
//! adapter whose files the base model's engine reads and finds fitting its shapes. Only
//! local paths are supported (`crate::config::local_adapter_dir`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{invalid_field, store};
use crate::backend::{check_adapter, AdapterRef, Backend, BackendError};
use crate::config::{check_adapter_base, local_adapter_dir};
use crate::error::{ApiError, ApiJson, ApiPath, RequestBody};
use crate::AppState;
use tollgate_metering::audit::Actor;
use tollgate_metering::store::{valid_id, StoreError};
use tollgate_metering::views::AdapterView;

/// `POST /admin/v1/customers/{id}/adapters`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAdapter {
    /// A local model of the catalogue (not an adapter itself).
    base_model: String,
    /// 1-64 letters, digits, `-`, `_`, `.`; unique among the customer's adapters. The model
    /// id is `<base_model>:<name>`.
    name: String,
    /// The absolute path of a PEFT adapter directory (`adapter_config.json`,
    /// `adapter_model.safetensors`) on the servers' disk. `s3://` URLs and Hugging Face repos
    /// are refused: only local paths are supported on this deployment.
    path: String,
}

impl RequestBody for CreateAdapter {}

/// `GET /admin/v1/customers/{id}/adapters`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdapterList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<AdapterView>,
}

/// The backend of `base`, a local model of the catalogue that adapters can go on, or a 400
/// naming `base_model`.
fn base_backend(state: &AppState, base: &str) -> Result<Arc<dyn Backend>, ApiError> {
    let refuse = |message: String| invalid_field("base_model", message);
    check_adapter_base(base, state.catalogue.model(base).as_ref()).map_err(refuse)?;
    state
        .catalogue
        .backend(base)
        .ok_or_else(|| refuse(format!("unknown base_model `{base}`")))
}

/// Registers a LoRA adapter for a customer: the model id `<base_model>:<name>`, usable and
/// listed by that customer's keys only. The adapter is read and checked against the base
/// model first (400 naming the problem).
#[utoipa::path(post, path = "/admin/v1/customers/{id}/adapters", tag = "admin",
    params(("id" = String, Path)),
    request_body = CreateAdapter,
    responses((status = 201, body = tollgate_metering::views::AdapterView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn create_adapter(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(customer_id): ApiPath<String>,
    ApiJson(body): ApiJson<CreateAdapter>,
) -> Result<Response, ApiError> {
    let store = store(&state)?;
    store.customer(&customer_id).await?;
    let CreateAdapter {
        base_model,
        name,
        path,
    } = body;
    if !valid_id(&name) {
        return Err(invalid_field(
            "name",
            format!("adapter name `{name}`: use 1-64 letters, digits, `-`, `_` and `.`"),
        ));
    }
    let base = base_backend(&state, &base_model)?;
    let id = format!("{base_model}:{name}");
    if state.catalogue.model(&id).is_some() {
        return Err(StoreError::Conflict(format!(
            "the model id `{id}` is the catalogue's (an operator's adapter); choose another name"
        ))
        .into());
    }
    let dir = local_adapter_dir(&path).map_err(|m| invalid_field("path", m))?;
    let reference = AdapterRef {
        name: name.clone(),
        path: Some(dir),
    };
    check_adapter(&*base, reference)
        .await
        .map_err(|e| match e {
            BackendError::Adapter(message) => invalid_field("path", message),
            other => other.into(),
        })?;
    let added = store
        .add_adapter(&customer_id, &name, &base_model, &path, &actor)
        .await?;
    state.reload_adapters().await;
    Ok((StatusCode::CREATED, Json(AdapterView::from(&added))).into_response())
}

/// A customer's LoRA adapters.
#[utoipa::path(get, path = "/admin/v1/customers/{id}/adapters", tag = "admin",
    params(("id" = String, Path)),
    responses((status = 200, body = AdapterList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn list_adapters(
    State(state): State<AppState>,
    ApiPath(customer_id): ApiPath<String>,
) -> Result<Json<AdapterList>, ApiError> {
    let store = store(&state)?;
    store.customer(&customer_id).await?;
    let all = store.adapters(Some(&customer_id)).await?;
    Ok(Json(AdapterList {
        object: "list",
        data: all.iter().map(AdapterView::from).collect(),
    }))
}

/// Removes a customer's LoRA adapter: its model id is gone for new requests at once (on
/// other replicas within seconds); requests in flight finish with it.
#[utoipa::path(delete, path = "/admin/v1/customers/{id}/adapters/{name}", tag = "admin",
    params(("id" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = tollgate_metering::views::AdapterView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn remove_adapter(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath((customer_id, name)): ApiPath<(String, String)>,
) -> Result<Json<AdapterView>, ApiError> {
    let removed = store(&state)?
        .remove_adapter(&customer_id, &name, &actor)
        .await?;
    state.reload_adapters().await;
    Ok(Json(AdapterView::from(&removed)))
}
