//! A customer's LoRA adapters: `/admin/v1/customers/{id}/adapters` (register, list) and
//! `/admin/v1/customers/{id}/adapters/{name}` (reprice, remove). A registered adapter is the
//! model id `<base_model>:<name>` for that customer's keys only (`crate::catalogue`), billed
//! at its own price (a model's `price` table in models.toml, validated the same way) or its
//! base model's, its records naming the base model and the adapter.
//!
//! Registering checks what a request would meet later, so a bad adapter is a 400 naming the
//! problem now rather than a server error on its first request: the base model is a local
//! model of the catalogue, the name a valid id, the price a valid price table, the path a
//! local directory holding a PEFT adapter whose files the base model's engine reads and finds
//! fitting its shapes. Only local paths are supported (`crate::config::local_adapter_dir`).
//! [`register`], [`reprice`] and [`unregister`] are the rules; the console's forms use them
//! too.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{invalid_field, store};
use crate::backend::{check_adapter, AdapterRef, Backend, BackendError};
use crate::config::{adapter_prices, check_adapter_base, local_adapter_dir};
use crate::error::{ApiError, ApiJson, ApiPath, RequestBody};
use crate::AppState;
use tollgate_metering::accounts::CustomerAdapter;
use tollgate_metering::audit::Actor;
use tollgate_metering::money::PriceTable;
use tollgate_metering::store::{valid_id, StoreError};
use tollgate_metering::views::AdapterView;

/// `POST /admin/v1/customers/{id}/adapters`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAdapter {
    /// A local model of the catalogue (not an adapter itself).
    pub base_model: String,
    /// 1-64 letters, digits, `-`, `_`, `.`; unique among the customer's adapters. The model
    /// id is `<base_model>:<name>`.
    pub name: String,
    /// The absolute path of a PEFT adapter directory (`adapter_config.json`,
    /// `adapter_model.safetensors`) on the servers' disk. `s3://` URLs and Hugging Face repos
    /// are refused: only local paths are supported on this deployment.
    pub path: String,
    /// The adapter's own prices: the keys of a model's `price` in models.toml (per-tier
    /// prices included; the adapter is sold at its base model's tiers), validated the same
    /// way. Absent or `null`: the base model's prices.
    #[serde(default)]
    pub price: Option<PriceTable>,
}

impl RequestBody for CreateAdapter {}

/// `PATCH /admin/v1/customers/{id}/adapters/{name}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAdapter {
    /// The adapter's prices for requests admitted from now on (a model's `price` keys);
    /// `null`: its base model's. Required.
    #[serde(default, deserialize_with = "super::patch")]
    #[schema(value_type = Option<PriceTable>)]
    pub price: Option<Option<PriceTable>>,
}

impl RequestBody for UpdateAdapter {}

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

/// `price` checked as an adapter's on `base` (a 400 naming the key at fault).
fn check_price(state: &AppState, base: &str, price: Option<&PriceTable>) -> Result<(), ApiError> {
    let Some(config) = state.catalogue.model(base) else {
        return Err(invalid_field(
            "base_model",
            format!("unknown base_model `{base}`"),
        ));
    };
    adapter_prices(&config, price)
        .map(drop)
        .map_err(|e| invalid_field(&e.field, e.message))
}

/// Registers `new` for `customer_id` after the checks a request would meet (400 naming the
/// field at fault, 404 for an unknown customer, 409 for a taken id), and has this process
/// serve it at once.
pub(crate) async fn register(
    state: &AppState,
    customer_id: &str,
    new: CreateAdapter,
    actor: &Actor,
) -> Result<CustomerAdapter, ApiError> {
    let store = store(state)?;
    store.customer(customer_id).await?;
    let CreateAdapter {
        base_model,
        name,
        path,
        price,
    } = new;
    if !valid_id(&name) {
        return Err(invalid_field(
            "name",
            format!("adapter name `{name}`: use 1-64 letters, digits, `-`, `_` and `.`"),
        ));
    }
    let base = base_backend(state, &base_model)?;
    check_price(state, &base_model, price.as_ref())?;
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
        .add_adapter(customer_id, &name, &base_model, &path, price, actor)
        .await?;
    state.reload_adapters().await;
    Ok(added)
}

/// Sets the price of `customer_id`'s adapter `name` (`None`: its base model's), checked as
/// at registration, for requests admitted from now on.
async fn reprice(
    state: &AppState,
    customer_id: &str,
    name: &str,
    price: Option<PriceTable>,
    actor: &Actor,
) -> Result<CustomerAdapter, ApiError> {
    let store = store(state)?;
    store.customer(customer_id).await?;
    let current = store.adapters(Some(customer_id)).await?;
    let Some(adapter) = current.iter().find(|a| a.name == name) else {
        return Err(StoreError::NotFound(format!(
            "customer `{customer_id}` has no adapter `{name}`"
        ))
        .into());
    };
    check_price(state, &adapter.base_model, price.as_ref())?;
    let updated = store
        .set_adapter_price(customer_id, name, price, actor)
        .await?;
    state.reload_adapters().await;
    Ok(updated)
}

/// Removes `customer_id`'s adapter `name`; this process stops serving it at once.
pub(crate) async fn unregister(
    state: &AppState,
    customer_id: &str,
    name: &str,
    actor: &Actor,
) -> Result<CustomerAdapter, ApiError> {
    let removed = store(state)?
        .remove_adapter(customer_id, name, actor)
        .await?;
    state.reload_adapters().await;
    Ok(removed)
}

/// Registers a LoRA adapter for a customer: the model id `<base_model>:<name>`, usable and
/// listed by that customer's keys only, at its own `price` or its base model's. The adapter
/// is read and checked against the base model first (400 naming the problem).
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
    let added = register(&state, &customer_id, body, &actor).await?;
    Ok((StatusCode::CREATED, Json(AdapterView::from(&added))).into_response())
}

/// Changes a customer's adapter's price: requests admitted from now on are billed at it (on
/// other replicas within seconds); records keep the price they were billed at. `null`: the
/// base model's prices.
#[utoipa::path(patch, path = "/admin/v1/customers/{id}/adapters/{name}", tag = "admin",
    params(("id" = String, Path), ("name" = String, Path)),
    request_body = UpdateAdapter,
    responses((status = 200, body = tollgate_metering::views::AdapterView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn update_adapter(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath((customer_id, name)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<UpdateAdapter>,
) -> Result<Json<AdapterView>, ApiError> {
    let Some(price) = body.price else {
        return Err(invalid_field(
            "price",
            "nothing to change: give `price` (a price table, or null for the base model's)".into(),
        ));
    };
    let updated = reprice(&state, &customer_id, &name, price, &actor).await?;
    Ok(Json(AdapterView::from(&updated)))
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
    let removed = unregister(&state, &customer_id, &name, &actor).await?;
    Ok(Json(AdapterView::from(&removed)))
}
