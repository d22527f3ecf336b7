//! Admin credentials and what each may do: scoped admin tokens issued through the admin API or
//! the CLI (kept by `tollgate_metering::store::admin_tokens`, looked up by digest), the bootstrap
//! `TOLLGATE_ADMIN_TOKEN` (scope `admin`), the admin middleware's check of a request against the
//! scope its route needs (declared with the route, in `admin`), and the per-address limit on
//! failed admin authentication.
//!
//! It owns the admin middleware's decision and the admin tokens' routes; the table, the scopes'
//! vocabulary and the queries are the store's, and the other admin routes live in `admin`.
//!
//! Scopes: `usage:read` (usage reports, records, invoices: what a billing export job needs),
//! `customers:read` (listing and reading customers), `customers:write` (customers; implies
//! `customers:read`), `keys:write` (client keys), `admin` (everything, including admin tokens
//! and the console). A route not declared with a narrower scope needs `admin`, so a new admin
//! route is closed to narrower tokens until someone decides otherwise.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::Value;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use crate::auth::bearer;

pub mod failures;
pub mod identity;

use crate::error::{from_object, ApiBytes, ApiError, ApiPath};
use crate::AppState;
pub use failures::{FailedAuth, FAILURE_WINDOW, MAX_FAILURES};
pub use identity::Scope;
pub use identity::{AdminIdentity, BOOTSTRAP_ID};
use tollgate_metering::audit::Actor;
use tollgate_metering::secrets::digest;
pub use tollgate_metering::store::admin_tokens::{
    parse_scopes, AdminToken, AdminTokenList, AdminTokenView, CreatedAdminTokenView,
};
use tollgate_metering::store::Store;

/// What the admin middleware decides on, taken from the request.
#[derive(Debug, Clone)]
pub struct AdminRequest {
    ip: Option<IpAddr>,
    method: Method,
    route: String,
    presented: String,
}

impl AdminRequest {
    pub fn of(request: &Request) -> Self {
        Self {
            ip: request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
            method: request.method().clone(),
            route: request
                .extensions()
                .get::<MatchedPath>()
                .map_or_else(String::new, |p| p.as_str().to_string()),
            presented: bearer(request.headers()).unwrap_or_default().to_string(),
        }
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The route template (`/admin/v1/keys/{key_id}`).
    pub fn route(&self) -> &str {
        &self.route
    }
}

/// The admin middleware's decision: who is calling and whether they may do this, which needs
/// `needed`. On refusal, the response to send (401 unknown token, 403 scope, 429 too many
/// failures).
pub async fn authorize(
    state: &AppState,
    request: AdminRequest,
    needed: Scope,
) -> Result<AdminIdentity, Response> {
    let AdminRequest {
        ip,
        method,
        route,
        presented,
    } = request;
    let now = Instant::now();
    if let Some(ip) = ip {
        if let Err(wait) = state.admin_failures.check(ip, now) {
            return Err(too_many_failures(wait));
        }
    }
    let identity = identify(state, &presented).await;
    let identity = match identity {
        Ok(identity) => identity,
        Err(refusal) => {
            if let (Some(ip), ApiError::InvalidAdminToken(_)) = (ip, &refusal) {
                state.admin_failures.record_failure(ip, now);
            }
            return Err(refusal.into_response());
        }
    };
    if !identity.allows(needed) {
        let implied = if needed == Scope::CustomersRead {
            " (or `customers:write`)"
        } else {
            ""
        };
        return Err(ApiError::InsufficientScope(format!(
            "admin token `{}` has scopes {}; {} {} needs `{}`{implied}",
            identity.token_id,
            identity
                .scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            method,
            route,
            needed.as_str()
        ))
        .into_response());
    }
    Ok(identity)
}

/// The bootstrap token (compared in constant time over digests) or an issued token.
pub(crate) async fn identify(state: &AppState, presented: &str) -> Result<AdminIdentity, ApiError> {
    if presented.is_empty() {
        return Err(ApiError::InvalidAdminToken(
            "missing admin token: send `Authorization: Bearer <admin token>`".into(),
        ));
    }
    if let Some(expected) = state.admin_token.as_deref() {
        if bool::from(digest(presented).ct_eq(&digest(expected))) {
            return Ok(AdminIdentity {
                token_id: BOOTSTRAP_ID.into(),
                scopes: vec![Scope::Admin],
            });
        }
    }
    let Some(store) = state.store.as_ref() else {
        return Err(ApiError::InvalidAdminToken("invalid admin token".into()));
    };
    match store.live_admin_token(presented).await {
        Ok(Some(token)) => Ok(AdminIdentity {
            token_id: token.id,
            scopes: token.scopes,
        }),
        Ok(None) => Err(ApiError::InvalidAdminToken("invalid admin token".into())),
        Err(e) => {
            tracing::error!("admin token lookup failed: {e}");
            Err(ApiError::Unavailable(
                "admin tokens cannot be checked right now; retry shortly".into(),
            ))
        }
    }
}

/// Whether the credential `token_id` still signs in: the bootstrap one while it is set, an
/// issued one until it is revoked.
pub(crate) async fn still_valid(state: &AppState, token_id: &str) -> Result<bool, ApiError> {
    if token_id == BOOTSTRAP_ID {
        return Ok(state.admin_token.is_some());
    }
    Ok(store(state)?.admin_token_is_live(token_id).await?)
}

fn too_many_failures(wait: u64) -> Response {
    let mut r = ApiError::RateLimited {
        message: format!(
            "too many failed admin authentications from this address; retry in {wait} s"
        ),
        unit: "requests",
        retry_after_secs: wait,
    }
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn store(state: &AppState) -> Result<&Store, ApiError> {
    state
        .store
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("this gateway runs without a database".into()))
}

/// `POST /admin/v1/admin_tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAdminToken {
    pub name: Option<String>,
    #[serde(default)]
    #[schema(value_type = Vec<Scope>, required, min_items = 1)]
    pub scopes: Option<Vec<String>>,
}

/// Issues a scoped admin token; its secret is in this answer only.
#[utoipa::path(post, operation_id = "create_admin_token", path = "/admin/v1/admin_tokens", tag = "admin",
    request_body = CreateAdminToken,
    responses((status = 201, body = CreatedAdminTokenView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiBytes(body): ApiBytes,
) -> Result<Response, ApiError> {
    let invalid = |param: &str, message: String| ApiError::InvalidRequest {
        message,
        param: Some(param.to_string()),
    };
    let map = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => map,
        _ => {
            return Err(ApiError::invalid(
                "the request body must be a JSON object",
                None,
            ))
        }
    };
    if let Some(k) = map
        .keys()
        .find(|k| !["name", "scopes"].contains(&k.as_str()))
    {
        return Err(invalid(
            k,
            format!("unknown field `{k}`; expected one of name, scopes"),
        ));
    }
    let body: CreateAdminToken = from_object(map)?;
    let Some(scopes) = body.scopes else {
        return Err(invalid(
            "scopes",
            format!(
                "`scopes` is required: a list of {}",
                Scope::ALL.map(Scope::as_str).join(", ")
            ),
        ));
    };
    let scopes =
        parse_scopes(scopes.iter().map(String::as_str)).map_err(|e| invalid("scopes", e))?;
    let (token, secret) = store(&state)?
        .issue_admin_token(&body.name.unwrap_or_default(), &scopes, &actor)
        .await?;
    let created = CreatedAdminTokenView {
        token: token.view(),
        secret,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// Admin tokens (scope `admin`), without their secrets.
#[utoipa::path(get, operation_id = "list_admin_tokens", path = "/admin/v1/admin_tokens", tag = "admin",
    responses((status = 200, body = AdminTokenList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub async fn list_handler(State(state): State<AppState>) -> Result<Json<AdminTokenList>, ApiError> {
    let tokens = store(&state)?.admin_tokens().await?;
    Ok(Json(AdminTokenList::of(&tokens)))
}

/// Revokes an admin token at once.
#[utoipa::path(delete, operation_id = "revoke_admin_token", path = "/admin/v1/admin_tokens/{id}", tag = "admin",
    params(("id" = String, Path)),
    responses((status = 200, body = AdminTokenView), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub async fn revoke_handler(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AdminTokenView>, ApiError> {
    Ok(Json(
        store(&state)?.revoke_admin_token(&id, &actor).await?.view(),
    ))
}
