//! Admin tokens: scoped credentials for the admin API and console, issued through the admin API
//! or the CLI, stored as the SHA-256 of their secret (`crate::secrets`) and looked up by it like
//! client keys. Issuing and revoking are audited in their own transaction (`crate::audit`).
//!
//! It owns the `admin_tokens` table and the scopes' vocabulary; what a request needs and the
//! admin middleware's decision are the gateway's (`api/admin_tokens`).
//!
//! Scopes: `usage:read` (usage reports, records, invoices: what a billing export job needs),
//! `customers:read` (listing and reading customers), `customers:write` (customers; implies
//! `customers:read`), `keys:write` (client keys), `admin` (everything, including admin tokens
//! and the console).

use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use utoipa::ToSchema;

use super::{now_micros, Store, StoreError, StoreResult};
use crate::audit::{self, Action, Actor, Change};
use crate::periods::rfc3339;
use crate::secrets::{new_admin_token, stored_digest};

/// What an admin token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[schema(as = AdminScope)]
pub enum Scope {
    #[serde(rename = "usage:read")]
    UsageRead,
    /// Listing and reading customers (`customers:write` implies it).
    #[serde(rename = "customers:read")]
    CustomersRead,
    #[serde(rename = "customers:write")]
    CustomersWrite,
    #[serde(rename = "keys:write")]
    KeysWrite,
    #[serde(rename = "admin")]
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
    /// The token as the admin API and the CLI show it.
    pub fn view(&self) -> AdminTokenView {
        AdminTokenView {
            object: "admin_token",
            id: self.id.clone(),
            name: self.name.clone(),
            token_prefix: self.token_prefix.clone(),
            scopes: self.scopes.clone(),
            created_at: rfc3339(self.created_at),
            revoked_at: self.revoked_at.map(rfc3339),
        }
    }
}

/// An admin token as the admin API and the CLI show it (never its secret).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = AdminToken)]
pub struct AdminTokenView {
    #[schema(value_type = String, pattern = "^admin_token$")]
    pub object: &'static str,
    pub id: String,
    pub name: String,
    pub token_prefix: String,
    pub scopes: Vec<Scope>,
    pub created_at: String,
    #[schema(required)]
    pub revoked_at: Option<String>,
}

/// A new admin token: the secret is shown this once.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = CreatedAdminToken)]
pub struct CreatedAdminTokenView {
    #[serde(flatten)]
    pub token: AdminTokenView,
    /// The secret to send as `Authorization: Bearer`.
    #[serde(rename = "token")]
    pub secret: String,
}

/// Admin tokens, as `GET /admin/v1/admin_tokens` and `tollgate admin-tokens list` show them.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdminTokenList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<AdminTokenView>,
}

impl AdminTokenList {
    pub fn of(tokens: &[AdminToken]) -> Self {
        Self {
            object: "list",
            data: tokens.iter().map(AdminToken::view).collect(),
        }
    }
}

const COLUMNS: &str = "id, name, token_prefix, scopes, created_at, revoked_at";

fn row_token(row: &sqlx::any::AnyRow) -> StoreResult<AdminToken> {
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

impl Store {
    /// Issues a token with these scopes: returns it and its secret, which is not stored (only
    /// its SHA-256) and cannot be shown again.
    pub async fn issue_admin_token(
        &self,
        name: &str,
        scopes: &[Scope],
        actor: &Actor,
    ) -> StoreResult<(AdminToken, String)> {
        let (id, secret) = new_admin_token();
        let token = AdminToken {
            id,
            name: name.to_string(),
            token_prefix: secret.chars().take(10).collect(),
            scopes: scopes.to_vec(),
            created_at: now_micros(),
            revoked_at: None,
        };
        let scopes: Vec<&str> = token.scopes.iter().map(|s| s.as_str()).collect();
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO admin_tokens (id, name, token_hash, token_prefix, scopes, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&token.id)
        .bind(&token.name)
        .bind(stored_digest(&secret))
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
        audit::record(&mut tx, self.kind(), actor, &change).await?;
        tx.commit().await?;
        Ok((token, secret))
    }

    /// Every admin token, revoked ones included, oldest first.
    pub async fn admin_tokens(&self) -> StoreResult<Vec<AdminToken>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM admin_tokens ORDER BY created_at, id"
        ))
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(row_token)
        .collect()
    }

    /// Revokes a token at once (its next request is refused).
    pub async fn revoke_admin_token(&self, id: &str, actor: &Actor) -> StoreResult<AdminToken> {
        let mut tx = self.write_tx().await?;
        let revoked = sqlx::query(
            "UPDATE admin_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        )
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
            audit::record(&mut tx, self.kind(), actor, &change).await?;
        }
        tx.commit().await?;
        Ok(token)
    }

    /// The live (unrevoked) token whose secret is `secret`, looked up by its digest.
    pub async fn live_admin_token(&self, secret: &str) -> StoreResult<Option<AdminToken>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM admin_tokens WHERE token_hash = $1 AND revoked_at IS NULL"
        ))
        .bind(stored_digest(secret))
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(row_token).transpose()
    }

    /// Whether the token `id` exists and is not revoked.
    pub async fn admin_token_is_live(&self, id: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT revoked_at FROM admin_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        Ok(match row {
            Some(row) => row.try_get::<Option<i64>, _>("revoked_at")?.is_none(),
            None => false,
        })
    }
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
