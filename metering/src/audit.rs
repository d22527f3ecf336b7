//! The audit log: who changed what among customers and keys, when, and from where. Every
//! mutating [`Store`](crate::store::Store) method takes the [`Actor`] making the change and
//! writes its [`Change`] in the same transaction as the change itself, so a change without its
//! audit row cannot exist. Entries hold field values (limits, budgets, names, tags), never a
//! secret: key secrets are not even passed to the store, only their digests, and those are left
//! out of entries too.
//!
//! Owns the actor and action types and the entry rows; `GET /admin/v1/audit` (in the gateway)
//! and the console read the same pages. It does not own authentication (the gateway's admin
//! API and console) or the mutations (store/).

use serde::Serialize;
use serde_json::{json, Map, Value};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use utoipa::ToSchema;

use crate::db::{now_micros, DbKind, Store, StoreResult};
use crate::periods::rfc3339;

/// Advisory lock id serializing audit inserts on PostgreSQL, so `seq` values become visible in
/// order and a cursor never skips an entry committed late (as for the ledger).
const AUDIT_LOCK: i64 = 0x746f_6c6c_6175_6474;

/// Through which door a change came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKind {
    /// `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN` on the admin API.
    AdminApi,
    /// A signed-in console session.
    Console,
    /// The `tollgate customers|keys` commands on the database host.
    Cli,
    /// The gateway itself (the built-in `default` customer at start).
    System,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AdminApi => "admin_api",
            Self::Console => "console",
            Self::Cli => "cli",
            Self::System => "system",
        }
    }
}

/// Who makes a change: the door, a name that tells sessions or users apart (never a token),
/// and the peer's address when it came over the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub kind: ActorKind,
    pub name: String,
    pub remote_addr: Option<String>,
    /// The request that made the change (`x-request-id`), when there was one.
    pub request_id: Option<String>,
}

impl Actor {
    /// The admin API, called with admin token `token_id` (`bootstrap` for
    /// `TOLLGATE_ADMIN_TOKEN`) from `remote_addr`.
    pub fn admin_api(
        token_id: &str,
        remote_addr: Option<String>,
        request_id: Option<String>,
    ) -> Self {
        Self {
            kind: ActorKind::AdminApi,
            name: format!("admin token {token_id}"),
            remote_addr,
            request_id,
        }
    }

    /// A console session, named by its public id (not its cookie).
    pub fn console(session: &str, remote_addr: Option<String>, request_id: Option<String>) -> Self {
        Self {
            kind: ActorKind::Console,
            name: format!("console session {session}"),
            remote_addr,
            request_id,
        }
    }

    /// The CLI, run by the OS user `user`.
    pub fn cli(user: &str) -> Self {
        Self {
            kind: ActorKind::Cli,
            name: format!("cli user {user}"),
            remote_addr: None,
            request_id: None,
        }
    }

    /// The CLI, run by the current OS user (`$USER`, else `$LOGNAME`, else the uid).
    pub fn cli_os_user() -> Self {
        let user = ["USER", "LOGNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
            .or_else(uid)
            .unwrap_or_else(|| "unknown".into());
        Self::cli(&user)
    }

    pub fn system() -> Self {
        Self {
            kind: ActorKind::System,
            name: "tollgate".into(),
            remote_addr: None,
            request_id: None,
        }
    }
}

/// The real uid from `/proc/self/status` (Linux), when no user variable is set (cron, systemd).
fn uid() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    let uid = line.split_whitespace().nth(1)?;
    Some(format!("uid {uid}"))
}

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    CustomerCreated,
    CustomerUpdated,
    KeyCreated,
    KeyUpdated,
    KeyRevoked,
    AlertSettingsUpdated,
    AdminTokenCreated,
    AdminTokenRevoked,
    ReservationCreated,
    ReservationEnded,
    /// A customer's LoRA adapter registered, repriced or removed.
    AdapterAdded,
    AdapterUpdated,
    AdapterRemoved,
    /// The model catalogue (models.toml) read again by a running server.
    CatalogueReloaded,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CustomerCreated => "customer.created",
            Self::CustomerUpdated => "customer.updated",
            Self::KeyCreated => "key.created",
            Self::KeyUpdated => "key.updated",
            Self::KeyRevoked => "key.revoked",
            Self::AlertSettingsUpdated => "alert_settings.updated",
            Self::AdminTokenCreated => "admin_token.created",
            Self::AdminTokenRevoked => "admin_token.revoked",
            Self::ReservationCreated => "reservation.created",
            Self::ReservationEnded => "reservation.ended",
            Self::AdapterAdded => "adapter.added",
            Self::AdapterUpdated => "adapter.updated",
            Self::AdapterRemoved => "adapter.removed",
            Self::CatalogueReloaded => "catalogue.reloaded",
        }
    }

    fn target_type(self) -> &'static str {
        match self {
            Self::CustomerCreated | Self::CustomerUpdated | Self::AlertSettingsUpdated => {
                "customer"
            }
            Self::KeyCreated | Self::KeyUpdated | Self::KeyRevoked => "key",
            Self::AdminTokenCreated | Self::AdminTokenRevoked => "admin_token",
            Self::ReservationCreated | Self::ReservationEnded => "reservation",
            Self::AdapterAdded | Self::AdapterUpdated | Self::AdapterRemoved => "adapter",
            Self::CatalogueReloaded => "catalogue",
        }
    }
}

/// One change, as the store hands it to [`record`]: for a creation the fields set, for an
/// update `{"field": {"from": old, "to": new}}` for each field that changed.
#[derive(Debug, Clone)]
pub struct Change {
    pub action: Action,
    pub target_id: String,
    pub changes: Value,
}

/// `{"field": {"from", "to"}}` for the fields whose values differ between `before` and `after`
/// (two JSON objects with the same keys). `None` when nothing changed.
pub fn diff(before: &Value, after: &Value) -> Option<Value> {
    let (Value::Object(before), Value::Object(after)) = (before, after) else {
        return None;
    };
    let changed: Map<String, Value> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, v)| {
            let old = before.get(k).cloned().unwrap_or(Value::Null);
            (k.clone(), json!({"from": old, "to": v}))
        })
        .collect();
    (!changed.is_empty()).then_some(Value::Object(changed))
}

/// Writes `change` by `actor` inside `tx`, the transaction that makes the change.
pub async fn record(
    tx: &mut Transaction<'static, Any>,
    kind: DbKind,
    actor: &Actor,
    change: &Change,
) -> StoreResult<()> {
    if kind == DbKind::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(AUDIT_LOCK)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query(
        "INSERT INTO audit_log (id, at, actor_kind, actor, remote_addr, request_id, action, \
         target_type, target_id, changes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(format!("audit_{}", uuid::Uuid::now_v7().simple()))
    .bind(now_micros())
    .bind(actor.kind.as_str())
    .bind(&actor.name)
    .bind(&actor.remote_addr)
    .bind(&actor.request_id)
    .bind(change.action.as_str())
    .bind(change.action.target_type())
    .bind(&change.target_id)
    .bind(change.changes.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One audit entry as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The cursor position (ledger-style sequence number).
    pub seq: i64,
    pub id: String,
    pub at: i64,
    pub actor_kind: String,
    pub actor: String,
    pub remote_addr: Option<String>,
    pub request_id: Option<String>,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub changes: Value,
}

impl Entry {
    fn from_row(row: &AnyRow) -> StoreResult<Self> {
        let changes: String = row.try_get("changes")?;
        Ok(Self {
            seq: row.try_get("seq")?,
            id: row.try_get("id")?,
            at: row.try_get("at")?,
            actor_kind: row.try_get("actor_kind")?,
            actor: row.try_get("actor")?,
            remote_addr: row.try_get("remote_addr")?,
            request_id: row.try_get("request_id")?,
            action: row.try_get("action")?,
            target_type: row.try_get("target_type")?,
            target_id: row.try_get("target_id")?,
            changes: serde_json::from_str(&changes).unwrap_or(Value::String(changes)),
        })
    }

    /// The entry as `GET /admin/v1/audit` shows it.
    pub fn view(&self) -> EntryView {
        EntryView {
            object: "audit_entry",
            id: self.id.clone(),
            time: rfc3339(self.at),
            actor: ActorView {
                kind: self.actor_kind.clone(),
                name: self.actor.clone(),
            },
            remote_addr: self.remote_addr.clone(),
            request_id: self.request_id.clone(),
            action: self.action.clone(),
            target: TargetView {
                kind: self.target_type.clone(),
                id: self.target_id.clone(),
            },
            changes: self.changes.clone(),
        }
    }
}

/// Who made a change: `admin_api`, `console` or `cli`, and a name (never a secret).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = AuditActor)]
pub struct ActorView {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
}

/// What a change was made to.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = AuditTarget)]
pub struct TargetView {
    /// `customer`, `key`, `admin_token`, `reservation`, `adapter` or `catalogue`.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
}

/// One entry of the audit log.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = AuditEntry)]
pub struct EntryView {
    #[schema(value_type = String, pattern = "^audit_entry$")]
    pub object: &'static str,
    pub id: String,
    pub time: String,
    pub actor: ActorView,
    #[schema(required)]
    pub remote_addr: Option<String>,
    #[schema(required)]
    pub request_id: Option<String>,
    /// `customer.created`, `customer.updated`, `key.created`, `key.updated`, `key.revoked`,
    /// `alert_settings.updated`, `admin_token.created`, `admin_token.revoked`,
    /// `reservation.created`, `reservation.ended`, `adapter.added`, `adapter.removed`,
    /// `catalogue.reloaded`.
    pub action: String,
    pub target: TargetView,
    /// For a creation the fields set; for an update `{"field": {"from", "to"}}`.
    pub changes: Value,
}

impl Store {
    /// Writes a change that touches no table of the store (a catalogue reload): the audit row
    /// alone, in a transaction of its own.
    pub async fn audit_only(&self, actor: &Actor, change: &Change) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        record(&mut tx, self.kind(), actor, change).await?;
        tx.commit().await?;
        Ok(())
    }
}

const ENTRY_COLUMNS: &str = "seq, id, at, actor_kind, actor, remote_addr, request_id, action, \
    target_type, target_id, changes";

impl Store {
    /// Entries after `cursor` (a `seq`), oldest first, for export jobs.
    pub async fn audit_after(&self, cursor: i64, limit: i64) -> StoreResult<Vec<Entry>> {
        self.audit_page("seq > $1 ORDER BY seq", cursor, limit)
            .await
    }

    /// Entries before `cursor` (a `seq`; `None`: the newest), newest first, for the console.
    pub async fn audit_before(&self, cursor: Option<i64>, limit: i64) -> StoreResult<Vec<Entry>> {
        self.audit_page(
            "seq < $1 ORDER BY seq DESC",
            cursor.unwrap_or(i64::MAX),
            limit,
        )
        .await
    }

    /// `limit` entries in `order`, a condition on `seq` against `cursor` (`$1`) and an order.
    async fn audit_page(&self, order: &str, cursor: i64, limit: i64) -> StoreResult<Vec<Entry>> {
        sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM audit_log WHERE {order} LIMIT $2"
        ))
        .bind(cursor)
        .bind(limit)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(Entry::from_row)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_only_the_fields_that_changed() {
        let before = json!({"name": "Acme", "rpm": 60, "tpm": null});
        let after = json!({"name": "Acme", "rpm": 120, "tpm": 1000});
        assert_eq!(
            diff(&before, &after).unwrap(),
            json!({"rpm": {"from": 60, "to": 120}, "tpm": {"from": null, "to": 1000}})
        );
        assert_eq!(diff(&before, &before), None);
    }

    #[test]
    fn actors_name_the_door_and_never_a_token() {
        let a = Actor::admin_api("bootstrap", Some("127.0.0.1:5".into()), None);
        assert_eq!(
            (a.kind.as_str(), a.name.as_str()),
            ("admin_api", "admin token bootstrap")
        );
        assert_eq!(Actor::cli("alice").name, "cli user alice");
        assert_eq!(
            Actor::console("sess_1", None, None).kind.as_str(),
            "console"
        );
    }
}
