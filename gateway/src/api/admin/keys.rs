//! `/admin/v1/customers/{id}/keys` (issue, list) and `/admin/v1/keys/{key_id}` (read, update,
//! revoke). A key's secret is shown once, when it is issued; only its digest is stored.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::tiers::{allow_priority, default_tier, DefaultServiceTier, TIER_FIELDS};
use super::{invalid_field, limit, limits_body, object, patch, reject_unknown, store, UsdAmount};
use crate::error::{from_object, ApiBytes, ApiError, ApiPath};
use crate::AppState;
use tollgate_metering::audit::Actor;
use tollgate_metering::billing::parse_time;
use tollgate_metering::periods::rfc3339;
use tollgate_metering::store::{now_micros, KeyFields, NewKey};
use tollgate_metering::tags::Tags;
use tollgate_metering::views::{CreatedKeyView, KeyView};

/// RFC 3339 or Unix seconds.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Expiry {
    Rfc3339(String),
    UnixSeconds(i64),
}

impl Expiry {
    /// In microseconds; it must be in the future.
    fn micros(&self) -> Result<i64, ApiError> {
        let micros = match self {
            Self::Rfc3339(s) => parse_time(s)
                .map_err(|e| invalid_field("expires_at", format!("expires_at: {e}")))?,
            Self::UnixSeconds(secs) => secs.saturating_mul(1_000_000),
        };
        if micros <= now_micros() {
            return Err(invalid_field(
                "expires_at",
                format!("expires_at {} is in the past", rfc3339(micros)),
            ));
        }
        Ok(micros)
    }
}

limits_body! {
    /// `POST /admin/v1/customers/{id}/keys`.
    pub struct CreateKey {
        pub name: Option<String>,
        /// The models this key may use (all when absent).
        pub models: Option<Vec<String>>,
        /// In the future.
        pub expires_at: Option<Expiry>,
        /// Default cost-allocation tags of the key's requests (at most 16 pairs).
        pub tags: Option<BTreeMap<String, String>>,
        pub budget_usd: Option<UsdAmount>,
    }
    concurrency = "Requests in flight at once with this key; beyond it, 429 with `Retry-After`.",
    tier = "The tier of requests that ask for `service_tier: \"auto\"` (or none) (else the customer's); `null`\nclears it.",
    priority = "Whether requests may ask for `service_tier: \"priority\"` (the key narrows its customer's permission, never widens it; true when created without it).",
}

limits_body! {
    /// `PATCH /admin/v1/keys/{key_id}`: at least one field; `null` clears a limit, the model list
    /// (all models), the expiry or the budget.
    pub struct UpdateKey {
        #[schema(min_length = 1)]
        pub name: Option<String>,
        #[serde(default, deserialize_with = "patch")]
        #[schema(value_type = Option<Vec<String>>)]
        pub models: Option<Option<Vec<String>>>,
        #[serde(default, deserialize_with = "patch")]
        #[schema(value_type = Option<Expiry>)]
        pub expires_at: Option<Option<Expiry>>,
        #[serde(default, deserialize_with = "patch")]
        #[schema(value_type = Option<BTreeMap<String, String>>)]
        pub tags: Option<Option<BTreeMap<String, String>>>,
        #[serde(default, deserialize_with = "patch")]
        #[schema(value_type = Option<UsdAmount>)]
        pub budget_usd: Option<Option<UsdAmount>>,
    }
    concurrency = "Requests in flight at once with this key; beyond it, 429 with `Retry-After`.",
    tier = "The tier of requests that ask for `service_tier: \"auto\"` (or none) (else the customer's); `null`\nclears it.",
    priority = "Whether requests may ask for `service_tier: \"priority\"` (the key narrows its customer's permission, never widens it; true when created without it).",
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<KeyView>,
}

/// `tags`, checked within the limits of request `metadata`.
fn checked_tags(tags: Tags) -> Result<Tags, ApiError> {
    tollgate_metering::tags::check(&tags, "tags")
        .map_err(|e| invalid_field(&e.param, e.message))?;
    Ok(tags)
}

/// `models`: each a model of the catalogue or one of `customer`'s own adapters.
fn known_models(
    state: &AppState,
    customer: &str,
    models: Vec<String>,
) -> Result<Vec<String>, ApiError> {
    if let Some(unknown) = models
        .iter()
        .find(|m| state.catalogue.served(customer, m).is_none())
    {
        return Err(invalid_field(
            "models",
            format!("unknown model `{unknown}` in `models`"),
        ));
    }
    Ok(models)
}

/// Issues a key; its secret is in this answer only.
#[utoipa::path(post, path = "/admin/v1/customers/{id}/keys", tag = "admin",
    params(("id" = String, Path)),
    request_body = CreateKey,
    responses((status = 201, body = tollgate_metering::views::CreatedKeyView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn create_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(customer_id): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Response, ApiError> {
    let map = object(&body)?;
    reject_unknown(
        &map,
        &[
            &[
                "name",
                "models",
                "rpm",
                "tpm",
                "expires_at",
                "tags",
                "budget_usd",
                "max_concurrent_requests",
            ][..],
            TIER_FIELDS,
        ]
        .concat(),
    )?;
    let body: CreateKey = from_object(map)?;
    let new = NewKey {
        name: body.name.unwrap_or_default(),
        models: body
            .models
            .map(|m| known_models(&state, &customer_id, m))
            .transpose()?,
        rpm: limit(body.rpm, "rpm")?.flatten(),
        tpm: limit(body.tpm, "tpm")?.flatten(),
        expires_at: body.expires_at.as_ref().map(Expiry::micros).transpose()?,
        tags: body.tags.map(checked_tags).transpose()?.unwrap_or_default(),
        budget_nano_usd: body
            .budget_usd
            .map(|b| b.nano_usd("budget_usd"))
            .transpose()?,
        max_concurrent_requests: limit(body.max_concurrent_requests, "max_concurrent_requests")?
            .flatten(),
        default_service_tier: default_tier(body.default_service_tier).flatten(),
        allow_priority: allow_priority(body.allow_priority)?,
    };
    let (created, secret) = store(&state)?.issue_key(&customer_id, new, &actor).await?;
    let body = CreatedKeyView {
        key: KeyView::from(&created),
        secret,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A customer's keys, without their secrets.
#[utoipa::path(get, path = "/admin/v1/customers/{id}/keys", tag = "admin",
    params(("id" = String, Path)),
    responses((status = 200, body = ApiKeyList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn list_keys(
    State(state): State<AppState>,
    ApiPath(customer_id): ApiPath<String>,
) -> Result<Json<ApiKeyList>, ApiError> {
    let keys = store(&state)?.list_keys(&customer_id).await?;
    Ok(Json(ApiKeyList {
        object: "list",
        data: keys.iter().map(KeyView::from).collect(),
    }))
}

/// A key (without its secret), with the customer it belongs to.
#[utoipa::path(get, path = "/admin/v1/keys/{key_id}", tag = "admin",
    params(("key_id" = String, Path)),
    responses((status = 200, body = tollgate_metering::views::KeyView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn get_key(
    State(state): State<AppState>,
    ApiPath(key_id): ApiPath<String>,
) -> Result<Json<KeyView>, ApiError> {
    Ok(Json(KeyView::from(&store(&state)?.key(&key_id).await?)))
}

/// The fields `PATCH /admin/v1/keys/{key_id}` changes.
const KEY_CHANGES: &[&str] = &[
    "name",
    "models",
    "rpm",
    "tpm",
    "max_concurrent_requests",
    "expires_at",
    "tags",
    "budget_usd",
    "default_service_tier",
    "allow_priority",
];

// Changes the given fields (`null` clears a limit, the model list, the expiry or the budget;
// `{}` or `null` clears the tags). Requests made with the key see the change within the key
// cache's lifetime (at once on this gateway).
/// Changes a key's limits, models, expiry, default tags or budget (`null` clears one).
#[utoipa::path(patch, path = "/admin/v1/keys/{key_id}", tag = "admin",
    params(("key_id" = String, Path)),
    request_body = UpdateKey,
    responses((status = 200, body = tollgate_metering::views::KeyView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn update_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(key_id): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<KeyView>, ApiError> {
    let map = object(&body)?;
    reject_unknown(&map, KEY_CHANGES)?;
    let body: UpdateKey = from_object(map)?;
    if body.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(invalid_field("name", "`name` must not be empty".into()));
    }
    let models = match body.models {
        Some(Some(m)) => {
            let owner = store(&state)?.key(&key_id).await?.customer_id;
            Some(Some(known_models(&state, &owner, m)?))
        }
        other => other,
    };
    let fields = KeyFields {
        name: body.name,
        models,
        rpm: limit(body.rpm, "rpm")?,
        tpm: limit(body.tpm, "tpm")?,
        max_concurrent_requests: limit(body.max_concurrent_requests, "max_concurrent_requests")?,
        expires_at: body
            .expires_at
            .map(|e| e.as_ref().map(Expiry::micros).transpose())
            .transpose()?,
        // `null` clears the tags, as `{}` does.
        tags: body
            .tags
            .map(|t| checked_tags(t.unwrap_or_default()))
            .transpose()?,
        budget_nano_usd: body
            .budget_usd
            .map(|b| b.map(|b| b.nano_usd("budget_usd")).transpose())
            .transpose()?,
        default_service_tier: default_tier(body.default_service_tier),
        allow_priority: allow_priority(body.allow_priority)?,
    };
    if fields.is_empty() {
        return Err(invalid_field(
            "tags",
            format!("nothing to change: give one of {}", KEY_CHANGES.join(", ")),
        ));
    }
    let key = store(&state)?
        .set_key_fields(&key_id, fields, &actor)
        .await?;
    state.auth.forget_key(&key_id);
    Ok(Json(KeyView::from(&key)))
}

/// Revokes a key at once.
#[utoipa::path(delete, path = "/admin/v1/keys/{key_id}", tag = "admin",
    params(("key_id" = String, Path)),
    responses((status = 200, body = tollgate_metering::views::KeyView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn revoke_key(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(key_id): ApiPath<String>,
) -> Result<Json<KeyView>, ApiError> {
    let key = store(&state)?.revoke_key(&key_id, &actor).await?;
    state.auth.forget_key(&key_id);
    Ok(Json(KeyView::from(&key)))
}
