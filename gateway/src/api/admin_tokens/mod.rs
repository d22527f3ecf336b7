//! Admin credentials and what each may do: scoped admin tokens issued through the admin API or
//! the CLI (stored as SHA-256 digests, looked up by digest like client keys), the bootstrap
//! `TOLLGATE_ADMIN_TOKEN` (scope `admin`), the admin middleware's check of a request against the
//! scope its route needs (declared with the route, in `admin`), and the per-address limit on
//! failed admin authentication.
//!
//! It owns the `admin_tokens` table and the admin middleware's decision; the admin routes
//! themselves live in `admin`.
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
use rand::RngCore;
use serde_json::{json, Value};
use sqlx::Row;
use subtle::ConstantTimeEq;

use crate::auth::{bearer, digest, hex};

mod failures;

use crate::error::{ApiBytes, ApiError, ApiPath};
use crate::AppState;
pub use failures::{FailedAuth, FAILURE_WINDOW, MAX_FAILURES};
use tollgate_metering::audit::{self, Action, Actor, Change};
use tollgate_metering::periods::rfc3339;
use tollgate_metering::store::{now_micros, Store, StoreError};

/// What an admin credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    UsageRead,
    CustomersRead,
    CustomersWrite,
    KeysWrite,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::UsageRead,
        Scope::CustomersRead,
        Scope::CustomersWrite,
        Scope::KeysWrite,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::UsageRead => "usage:read",
            Self::CustomersRead => "customers:read",
            Self::CustomersWrite => "customers:write",
            Self::KeysWrite => "keys:write",
            Self::Admin => "admin",
        }
    }

    /// Whether a credential with this scope may do what `needed` allows.
    pub fn implies(self, needed: Scope) -> bool {
        self == needed
            || self == Self::Admin
            || (self == Self::CustomersWrite && needed == Self::CustomersRead)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == text.trim())
            .ok_or_else(|| {
                format!(
                    "unknown scope `{text}`; use {}",
                    Self::ALL.map(Scope::as_str).join(", ")
                )
            })
    }
}

/// Parses a list of scopes (deduplicated, sorted); at least one.
pub fn parse_scopes<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Vec<Scope>, String> {
    let mut scopes = items
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .map(Scope::parse)
        .collect::<Result<Vec<_>, _>>()?;
    scopes.sort();
    scopes.dedup();
    if scopes.is_empty() {
        return Err("at least one scope is needed".into());
    }
    Ok(scopes)
}

/// Who made an admin request: in the request's extensions for the handlers (and the audit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminIdentity {
    /// The token's id, or `bootstrap` for `TOLLGATE_ADMIN_TOKEN`.
    pub token_id: String,
    pub scopes: Vec<Scope>,
}

/// The id the bootstrap token is known by.
pub const BOOTSTRAP_ID: &str = "bootstrap";

impl AdminIdentity {
    pub fn allows(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|s| s.implies(needed))
    }
}

/// An issued admin token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub id: String,
    pub name: String,
    pub token_prefix: String,
    pub scopes: Vec<Scope>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl AdminToken {
    pub fn json(&self) -> Value {
        json!({
            "object": "admin_token",
            "id": self.id,
            "name": self.name,
            "token_prefix": self.token_prefix,
            "scopes": self.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "created_at": rfc3339(self.created_at),
            "revoked_at": self.revoked_at.map(rfc3339),
        })
    }
}

const COLUMNS: &str = "id, name, token_prefix, scopes, created_at, revoked_at";

fn row_token(row: &sqlx::any::AnyRow) -> Result<AdminToken, StoreError> {
    let scopes: String = row.try_get("scopes")?;
    Ok(AdminToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        token_prefix: row.try_get("token_prefix")?,
        scopes: parse_scopes(scopes.split(',')).map_err(StoreError::Invalid)?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// Issues a token with these scopes: returns it and its secret, which is not stored (only its
/// SHA-256) and cannot be shown again.
pub async fn issue(
    store: &Store,
    name: &str,
    scopes: &[Scope],
    actor: &Actor,
) -> Result<(AdminToken, String), StoreError> {
    let mut secret = [0u8; 32];
    let mut id = [0u8; 8];
    rand::rng().fill_bytes(&mut secret);
    rand::rng().fill_bytes(&mut id);
    let secret = format!("tga-{}", hex(&secret));
    let token = AdminToken {
        id: format!("adm_{}", hex(&id)),
        name: name.to_string(),
        token_prefix: secret.chars().take(10).collect(),
        scopes: scopes.to_vec(),
        created_at: now_micros(),
        revoked_at: None,
    };
    let scopes: Vec<&str> = token.scopes.iter().map(|s| s.as_str()).collect();
    let mut tx = store.write_tx().await?;
    sqlx::query(
        "INSERT INTO admin_tokens (id, name, token_hash, token_prefix, scopes, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&token.id)
    .bind(&token.name)
    .bind(hex(&digest(&secret)))
    .bind(&token.token_prefix)
    .bind(scopes.join(","))
    .bind(token.created_at)
    .execute(&mut *tx)
    .await?;
    let change = Change {
        action: Action::AdminTokenCreated,
        target_id: token.id.clone(),
        changes: json!({"name": token.name, "scopes": scopes}),
    };
    audit::record(&mut tx, store.kind(), actor, &change).await?;
    tx.commit().await?;
    Ok((token, secret))
}

pub async fn list(store: &Store) -> Result<Vec<AdminToken>, StoreError> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM admin_tokens ORDER BY created_at, id"
    ))
    .fetch_all(store.pool())
    .await?
    .iter()
    .map(row_token)
    .collect()
}

/// Revokes a token at once (its next request is refused).
pub async fn revoke(store: &Store, id: &str, actor: &Actor) -> Result<AdminToken, StoreError> {
    let mut tx = store.write_tx().await?;
    let revoked =
        sqlx::query("UPDATE admin_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM admin_tokens WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let token = match row {
        Some(row) => row_token(&row)?,
        None => return Err(StoreError::NotFound(format!("no admin token `{id}`"))),
    };
    if revoked.rows_affected() > 0 {
        let change = Change {
            action: Action::AdminTokenRevoked,
            target_id: token.id.clone(),
            changes: json!({"revoked_at": token.revoked_at.map(rfc3339)}),
        };
        audit::record(&mut tx, store.kind(), actor, &change).await?;
    }
    tx.commit().await?;
    Ok(token)
}

/// The live (unrevoked) token whose secret is `secret`, looked up by its digest.
async fn find(store: &Store, secret: &str) -> Result<Option<AdminToken>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM admin_tokens WHERE token_hash = $1 AND revoked_at IS NULL"
    ))
    .bind(hex(&digest(secret)))
    .fetch_optional(store.pool())
    .await?;
    row.as_ref().map(row_token).transpose()
}

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
    match find(store, presented).await {
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
    let row = sqlx::query("SELECT revoked_at FROM admin_tokens WHERE id = $1")
        .bind(token_id)
        .fetch_optional(store(state)?.pool())
        .await
        .map_err(StoreError::from)?;
    Ok(match row {
        Some(row) => row
            .try_get::<Option<i64>, _>("revoked_at")
            .map_err(StoreError::from)?
            .is_none(),
        None => false,
    })
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

// `{"name", "scopes": [...]}` → 201 with the secret, once.
/// Issues a scoped admin token; its secret is in this answer only.
#[utoipa::path(post, operation_id = "create_admin_token", path = "/admin/v1/admin_tokens", tag = "admin",
    request_body = crate::openapi::admin_schemas::CreateAdminToken,
    responses((status = 201, body = crate::openapi::admin_schemas::CreatedAdminToken), crate::openapi::AdminErrors),
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
    let name = match map.get("name") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => return Err(invalid("name", format!("`name` must be a string, got {v}"))),
    };
    let scopes: Vec<&str> = match map.get("scopes") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| invalid("scopes", format!("`scopes` must be strings, got {v}")))
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(invalid(
                "scopes",
                format!(
                    "`scopes` is required: a list of {}",
                    Scope::ALL.map(Scope::as_str).join(", ")
                ),
            ))
        }
    };
    let scopes = parse_scopes(scopes).map_err(|e| invalid("scopes", e))?;
    let (token, secret) = issue(store(&state)?, &name, &scopes, &actor).await?;
    let mut body = token.json();
    body["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Admin tokens (scope `admin`), without their secrets.
#[utoipa::path(get, operation_id = "list_admin_tokens", path = "/admin/v1/admin_tokens", tag = "admin",
    responses((status = 200, body = crate::openapi::admin_schemas::AdminTokenList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub async fn list_handler(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let tokens = list(store(&state)?).await?;
    Ok(Json(json!({
        "object": "list",
        "data": tokens.iter().map(AdminToken::json).collect::<Vec<_>>(),
    })))
}

/// Revokes an admin token at once.
#[utoipa::path(delete, operation_id = "revoke_admin_token", path = "/admin/v1/admin_tokens/{id}", tag = "admin",
    params(("id" = String, Path)),
    responses((status = 200, body = crate::openapi::admin_schemas::AdminToken), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub async fn revoke_handler(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(revoke(store(&state)?, &id, &actor).await?.json()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_strictly() {
        assert_eq!(
            parse_scopes(["keys:write", "usage:read", "keys:write"]).unwrap(),
            vec![Scope::UsageRead, Scope::KeysWrite]
        );
        assert!(parse_scopes(["usage:write"])
            .unwrap_err()
            .contains("usage:write"));
        assert!(parse_scopes([]).is_err());
    }
}
