//! The database behind customers, API keys and the usage ledger: SQLite (a file, no setup) or
//! PostgreSQL, chosen by the URL, through one set of queries (sqlx's `Any` driver).
//!
//! Portable on purpose: times are Unix microseconds (`BIGINT`), money is integer nano-USD,
//! booleans are 0/1, placeholders are `$N`. Each backend has its own migrations
//! (`migrations/sqlite`, `migrations/postgres`).
//!
//! Ledger order: records get an increasing `seq` that export cursors follow. On PostgreSQL
//! several gateways insert concurrently, so an insert transaction takes an advisory lock first:
//! `seq` values then become visible in order and a cursor never skips a record committed late.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use crate::audit::{self, Action, Actor, Change};
use crate::money::format_usd;
use crate::tags::{self, Tags};

/// Advisory lock id serializing ledger inserts on PostgreSQL.
const LEDGER_LOCK: i64 = 0x746f_6c6c_6761_7465;
/// Rows per multi-row insert on PostgreSQL (22 parameters each; well under its limit).
const INSERT_CHUNK: usize = 200;
/// Rows per multi-row insert on SQLite: binding a parameter looks its name up by a linear
/// search (`sqlite3_bind_parameter_name`), so a statement's binding cost grows with the square
/// of its parameters; at 200 rows it took a tenth of the gateway's CPU under load.
const INSERT_CHUNK_SQLITE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database unreachable moments ago; not asked again yet")]
    Down,
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// The database could not be reached (as opposed to refusing or failing the statement).
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Db(e) => is_unreachable(e),
            Self::Down => true,
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

/// Now, in Unix microseconds.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// A customer: who pays. Limits are optional (`None` = unlimited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    pub name: String,
    pub budget_nano_usd: Option<i64>,
    pub budget_period: String,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub created_at: i64,
    /// Requests in flight at once across the customer's keys; `None` = no cap.
    #[serde(default)]
    pub max_concurrent_requests: Option<i64>,
}

/// An API key without its secret (only the SHA-256 of the secret is stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub customer_id: String,
    pub name: String,
    /// The first characters of the secret, to recognise it in lists.
    pub key_prefix: String,
    /// Models the key may use; `None` = all.
    pub models: Option<Vec<String>>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
    /// Default cost-allocation tags of the key's records.
    #[serde(default)]
    pub tags: Tags,
    /// The key's own monthly budget in nano-USD; `None` = only its customer's applies.
    #[serde(default)]
    pub budget_nano_usd: Option<i64>,
    /// Requests in flight at once with this key; `None` = no cap of its own.
    #[serde(default)]
    pub max_concurrent_requests: Option<i64>,
}

/// Fields of a new or patched customer.
#[derive(Debug, Clone, Default)]
pub struct CustomerFields {
    pub name: Option<String>,
    /// `Some(None)` clears the budget.
    pub budget_nano_usd: Option<Option<i64>>,
    pub budget_period: Option<String>,
    pub rpm: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
    /// `Some(None)` clears the cap.
    pub max_concurrent_requests: Option<Option<i64>>,
}

/// Fields of a new key.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub models: Option<Vec<String>>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub expires_at: Option<i64>,
    pub tags: Tags,
    pub budget_nano_usd: Option<i64>,
    pub max_concurrent_requests: Option<i64>,
}

/// One request's usage, as written to the ledger. Times in Unix microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub id: String,
    pub customer_id: String,
    pub key_id: String,
    pub model: String,
    pub endpoint: String,
    pub stream: bool,
    /// `completed`, `cancelled` or `failed`.
    pub status: String,
    pub finish_reason: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub ttft_ms: Option<i64>,
    pub input_price_per_mtok: String,
    pub output_price_per_mtok: String,
    pub cost_nano_usd: i64,
    /// Of `input_tokens`, those served from a prefix cache.
    #[serde(default)]
    pub cached_input_tokens: i64,
    /// The unit price of cached prompt tokens (`None` on records older than it: the input
    /// price).
    #[serde(default)]
    pub cached_input_price_per_mtok: Option<String>,
    /// The part of `cost_nano_usd` that is cached prompt tokens (rounded alone).
    #[serde(default)]
    pub cached_cost_nano_usd: i64,
    /// Where the token counts came from: `engine`, `upstream`, or `observed` (an upstream
    /// reported fewer output tokens than the gateway saw, or none).
    #[serde(default)]
    pub usage_source: Option<String>,
    /// Cost-allocation tags: the request's `metadata` and `user` with its key's default tags.
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    pub tags: Tags,
    /// The `Idempotency-Key` its request carried: a repeat of the request replays the stored
    /// result and has no record of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Columns usage can be grouped by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// The value of one tag (`tag:project`); records without it form their own group.
    Tag(String),
    Customer,
    Model,
    Key,
    /// UTC day (`started_at` truncated to the day).
    Day,
    /// The unit prices applied (for invoice line items).
    Prices,
}

/// Which records an aggregate covers: `started_at` in `[start, end)`.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub start: i64,
    pub end: i64,
    pub customer_id: Option<String>,
    pub model: Option<String>,
    /// Only records whose tag `.0` has the value `.1`.
    pub tag: Option<(String, String)>,
}

/// One row of an aggregate; group columns not asked for are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRow {
    pub customer_id: Option<String>,
    pub model: Option<String>,
    pub key_id: Option<String>,
    /// With `GroupBy::Day`: the day's start; with buckets: the bucket's start (micros).
    pub bucket_start: Option<i64>,
    /// With `GroupBy::Tag`: the tag's value (`None`: records without the tag).
    pub tag_value: Option<String>,
    pub input_price_per_mtok: Option<String>,
    pub output_price_per_mtok: Option<String>,
    pub cached_input_price_per_mtok: Option<String>,
    pub requests: i64,
    pub input_tokens: i64,
    /// Of `input_tokens`, those served from a prefix cache.
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub cost_nano_usd: i64,
    /// Of `cost_nano_usd`, the cached prompt tokens' part.
    pub cached_cost_nano_usd: i64,
}

/// A connection pool to the ledger database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    kind: DbKind,
    /// Until when (Unix micros) request-path lookups skip the database after it could not be
    /// reached, so requests are served from caches at once instead of each waiting for a
    /// connection; the first lookup after that probes it again.
    down_until: Arc<AtomicI64>,
}

/// How long request-path lookups skip a database that could not be reached.
const DOWN_FOR_MICROS: i64 = 1_000_000;
/// Longest a probe of a down database may take before another one starts (above the pool's
/// acquire timeout).
const PROBE_MICROS: i64 = 10_000_000;

/// Errors that mean the database cannot be reached (as opposed to a failing statement).
fn is_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        // PostgreSQL's class 57P: the server shut down (57P01, 57P02) or is still starting
        // (57P03); the statement never ran.
        sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("57P")),
        _ => false,
    }
}

/// `sqlite://…`, `postgres://…`, or a bare file path. A SQLite file is created when missing,
/// whichever way it is named, unless the URL chooses its own `mode` (or is in memory).
pub fn normalize_url(url: &str) -> String {
    if !url.starts_with("sqlite:") {
        return if url.contains("://") {
            url.to_string()
        } else {
            format!("sqlite://{url}?mode=rwc")
        };
    }
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let has_mode = query.split('&').any(|p| p.starts_with("mode="));
    if has_mode || path.contains(":memory:") {
        url.to_string()
    } else if query.is_empty() {
        format!("{path}?mode=rwc")
    } else {
        format!("{path}?{query}&mode=rwc")
    }
}

pub const RECORD_COLUMNS: &str = "id, customer_id, key_id, model, endpoint, stream, status, \
    finish_reason, input_tokens, output_tokens, started_at, finished_at, ttft_ms, \
    input_price_per_mtok, output_price_per_mtok, cost_nano_usd, cached_input_tokens, \
    cached_input_price_per_mtok, cached_cost_nano_usd, usage_source, tags, idempotency_key";
/// Columns of [`RECORD_COLUMNS`], one bound parameter each.
const RECORD_PARAMS: usize = 22;
const KEY_COLUMNS: &str = "id, customer_id, name, key_prefix, models, rpm, tpm, expires_at, \
    revoked_at, created_at, tags, budget_nano_usd, max_concurrent_requests";
const CUSTOMER_COLUMNS: &str =
    "id, name, budget_nano_usd, budget_period, rpm, tpm, created_at, max_concurrent_requests";

fn customer(row: &AnyRow) -> StoreResult<Customer> {
    Ok(Customer {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        budget_nano_usd: row.try_get("budget_nano_usd")?,
        budget_period: row.try_get("budget_period")?,
        rpm: row.try_get("rpm")?,
        tpm: row.try_get("tpm")?,
        created_at: row.try_get("created_at")?,
        max_concurrent_requests: row.try_get("max_concurrent_requests")?,
    })
}

fn api_key(row: &AnyRow) -> StoreResult<ApiKey> {
    let models: Option<String> = row.try_get("models")?;
    let models = match models {
        Some(json) => Some(
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Invalid(format!("stored key models `{json}`: {e}")))?,
        ),
        None => None,
    };
    Ok(ApiKey {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        name: row.try_get("name")?,
        key_prefix: row.try_get("key_prefix")?,
        models,
        rpm: row.try_get("rpm")?,
        tpm: row.try_get("tpm")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        created_at: row.try_get("created_at")?,
        tags: stored_tags(row)?,
        budget_nano_usd: row.try_get("budget_nano_usd")?,
        max_concurrent_requests: row.try_get("max_concurrent_requests")?,
    })
}

pub fn record(row: &AnyRow) -> StoreResult<UsageRecord> {
    Ok(UsageRecord {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        key_id: row.try_get("key_id")?,
        model: row.try_get("model")?,
        endpoint: row.try_get("endpoint")?,
        stream: row.try_get::<i64, _>("stream")? != 0,
        status: row.try_get("status")?,
        finish_reason: row.try_get("finish_reason")?,
        input_tokens: row.try_get("input_tokens")?,
        output_tokens: row.try_get("output_tokens")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        ttft_ms: row.try_get("ttft_ms")?,
        input_price_per_mtok: row.try_get("input_price_per_mtok")?,
        output_price_per_mtok: row.try_get("output_price_per_mtok")?,
        cost_nano_usd: row.try_get("cost_nano_usd")?,
        cached_input_tokens: row.try_get("cached_input_tokens")?,
        cached_input_price_per_mtok: row.try_get("cached_input_price_per_mtok")?,
        cached_cost_nano_usd: row.try_get("cached_cost_nano_usd")?,
        usage_source: row.try_get("usage_source")?,
        tags: stored_tags(row)?,
        idempotency_key: row.try_get("idempotency_key")?,
    })
}

fn stored_tags(row: &AnyRow) -> StoreResult<Tags> {
    let text: Option<String> = row.try_get("tags")?;
    tags::from_json(text.as_deref()).map_err(StoreError::Invalid)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// A customer's fields as the audit log shows them (money as decimal USD).
fn audited_customer(c: &Customer) -> serde_json::Value {
    serde_json::json!({
        "name": c.name,
        "budget_usd": c.budget_nano_usd.map(format_usd),
        "budget_period": c.budget_period,
        "rpm": c.rpm,
        "tpm": c.tpm,
    })
}

/// A key's fields as the audit log shows them: never its secret, its digest or its prefix.
fn audited_key(k: &ApiKey) -> serde_json::Value {
    serde_json::json!({
        "customer_id": k.customer_id,
        "name": k.name,
        "models": k.models,
        "rpm": k.rpm,
        "tpm": k.tpm,
        "expires_at": k.expires_at.map(crate::periods::rfc3339),
        "revoked_at": k.revoked_at.map(crate::periods::rfc3339),
        "tags": k.tags,
        "budget_usd": k.budget_nano_usd.map(format_usd),
    })
}

/// A change to an existing key.
enum KeyChange<'a> {
    Tags(&'a Tags),
    Budget(Option<i64>),
    Revoke,
}

/// One key by id, inside a transaction.
async fn key_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    key_id: &str,
) -> StoreResult<ApiKey> {
    let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
        .bind(key_id)
        .fetch_optional(&mut **tx)
        .await?;
    match row {
        Some(row) => api_key(&row),
        None => Err(StoreError::NotFound(format!("no key `{key_id}`"))),
    }
}

impl Store {
    /// Connects (creating a SQLite file when missing) and applies the migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let url = normalize_url(url);
        let kind = if url.starts_with("sqlite:") {
            DbKind::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            DbKind::Postgres
        } else {
            return Err(StoreError::Invalid(format!(
                "unsupported database URL `{url}`: use sqlite://PATH, a file path, or postgres://…"
            )));
        };
        let options = AnyPoolOptions::new()
            .max_connections(if kind == DbKind::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(5))
            // A connection left over from before a database restart is found dead here, not
            // by the statement that would use it.
            .test_before_acquire(true);
        let options = if kind == DbKind::Sqlite {
            options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                         PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                    )
                    .await?;
                    Ok(())
                })
            })
        } else {
            options
        };
        let pool = options.connect(&url).await?;
        match kind {
            DbKind::Sqlite => sqlx::migrate!("migrations/sqlite").run(&pool).await?,
            DbKind::Postgres => sqlx::migrate!("migrations/postgres").run(&pool).await?,
        }
        Ok(Self {
            pool,
            kind,
            down_until: Arc::default(),
        })
    }

    /// A transaction that writes. SQLite's is begun IMMEDIATE: a deferred one that reads
    /// first cannot take the write lock once another connection has written meanwhile (the
    /// ledger's batch insert while an operator revokes a key): SQLite then fails at once with
    /// SQLITE_BUSY, which `busy_timeout` does not wait out.
    pub async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.kind {
            DbKind::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            DbKind::Postgres => self.pool.begin().await,
        }
    }

    /// Whether request-path lookups should skip the database for now (see `down_until`).
    /// Once the pause is over, a background probe asks the database; requests keep skipping
    /// it until the probe gets an answer, so none of them waits on a dead database.
    pub fn is_down(&self) -> bool {
        let until = self.down_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        let now = now_micros();
        if now < until {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        // One caller starts the probe; a probe that hangs is replaced after PROBE_MICROS.
        if self
            .down_until
            .compare_exchange(
                until,
                now + PROBE_MICROS,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            let store = self.clone();
            runtime.spawn(async move {
                let answer = sqlx::query("SELECT 1").execute(&store.pool).await;
                store.observe(&answer);
                if answer.is_ok() {
                    tracing::info!("the database answers again");
                }
            });
        }
        true
    }

    /// Notes the outcome of a request-path call: an unreachable database is skipped for a
    /// moment; any answer means it is back.
    pub fn observe<T>(&self, result: &Result<T, sqlx::Error>) {
        match result {
            Ok(_) => {
                if self.down_until.load(Ordering::Relaxed) != 0 {
                    self.down_until.store(0, Ordering::Relaxed);
                }
            }
            Err(e) => self.observe_error(e),
        }
    }

    fn observe_error(&self, e: &sqlx::Error) {
        if is_unreachable(e) {
            self.down_until
                .store(now_micros() + DOWN_FOR_MICROS, Ordering::Relaxed);
        }
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Runs one statement as is (maintenance and tests).
    #[doc(hidden)]
    pub async fn execute_raw(&self, sql: &str) -> StoreResult<()> {
        sqlx::query(sql).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- customers -------------------------------------------------------------------------

    pub async fn create_customer(
        &self,
        id: &str,
        fields: CustomerFields,
        actor: &Actor,
    ) -> StoreResult<Customer> {
        let c = Customer {
            id: id.to_string(),
            name: fields.name.unwrap_or_else(|| id.to_string()),
            budget_nano_usd: fields.budget_nano_usd.flatten(),
            budget_period: fields.budget_period.unwrap_or_else(|| "monthly".into()),
            rpm: fields.rpm.flatten(),
            tpm: fields.tpm.flatten(),
            created_at: now_micros(),
            max_concurrent_requests: fields.max_concurrent_requests.flatten(),
        };
        let mut tx = self.write_tx().await?;
        let result = sqlx::query(&format!(
            "INSERT INTO customers ({CUSTOMER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&c.id)
        .bind(&c.name)
        .bind(c.budget_nano_usd)
        .bind(&c.budget_period)
        .bind(c.rpm)
        .bind(c.tpm)
        .bind(c.created_at)
        .bind(c.max_concurrent_requests)
        .execute(&mut *tx)
        .await;
        match result {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!(
                    "customer `{id}` already exists"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        let change = Change {
            action: Action::CustomerCreated,
            target_id: c.id.clone(),
            changes: audited_customer(&c),
        };
        audit::record(&mut tx, self.kind, actor, &change).await?;
        tx.commit().await?;
        Ok(c)
    }

    /// Creates the customer unless it exists (for the built-in `default` customer).
    pub async fn ensure_customer(&self, id: &str, name: &str) -> StoreResult<()> {
        let fields = CustomerFields {
            name: Some(name.to_string()),
            ..Default::default()
        };
        match self.create_customer(id, fields, &Actor::system()).await {
            Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn list_customers(&self) -> StoreResult<Vec<Customer>> {
        sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(customer)
        .collect()
    }

    /// One customer. On the request path: fails at once while the database is considered
    /// down.
    pub async fn customer(&self, id: &str) -> StoreResult<Customer> {
        if self.is_down() {
            return Err(StoreError::Down);
        }
        let row = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await;
        self.observe(&row);
        let row = row?;
        match row {
            Some(row) => customer(&row),
            None => Err(StoreError::NotFound(format!("no customer `{id}`"))),
        }
    }

    pub async fn update_customer(
        &self,
        id: &str,
        fields: CustomerFields,
        actor: &Actor,
    ) -> StoreResult<Customer> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("no customer `{id}`")));
        };
        let before = customer(&row)?;
        let mut c = before.clone();
        if let Some(name) = fields.name {
            c.name = name;
        }
        if let Some(budget) = fields.budget_nano_usd {
            c.budget_nano_usd = budget;
        }
        if let Some(period) = fields.budget_period {
            c.budget_period = period;
        }
        if let Some(rpm) = fields.rpm {
            c.rpm = rpm;
        }
        if let Some(tpm) = fields.tpm {
            c.tpm = tpm;
        }
        if let Some(cap) = fields.max_concurrent_requests {
            c.max_concurrent_requests = cap;
        }
        sqlx::query(
            "UPDATE customers SET name = $2, budget_nano_usd = $3, budget_period = $4, \
             rpm = $5, tpm = $6, max_concurrent_requests = $7 WHERE id = $1",
        )
        .bind(&c.id)
        .bind(&c.name)
        .bind(c.budget_nano_usd)
        .bind(&c.budget_period)
        .bind(c.rpm)
        .bind(c.tpm)
        .bind(c.max_concurrent_requests)
        .execute(&mut *tx)
        .await?;
        if let Some(changes) = audit::diff(&audited_customer(&before), &audited_customer(&c)) {
            let change = Change {
                action: Action::CustomerUpdated,
                target_id: c.id.clone(),
                changes,
            };
            audit::record(&mut tx, self.kind, actor, &change).await?;
        }
        tx.commit().await?;
        Ok(c)
    }

    // ---- keys ------------------------------------------------------------------------------

    /// Stores a key given the SHA-256 hex of its secret.
    pub async fn create_key(
        &self,
        customer_id: &str,
        key_id: &str,
        key_hash: &str,
        key_prefix: &str,
        new: NewKey,
        actor: &Actor,
    ) -> StoreResult<ApiKey> {
        self.customer(customer_id).await?;
        let key = ApiKey {
            id: key_id.to_string(),
            customer_id: customer_id.to_string(),
            name: new.name,
            key_prefix: key_prefix.to_string(),
            models: new.models,
            rpm: new.rpm,
            tpm: new.tpm,
            expires_at: new.expires_at,
            revoked_at: None,
            created_at: now_micros(),
            tags: new.tags,
            budget_nano_usd: new.budget_nano_usd,
            max_concurrent_requests: new.max_concurrent_requests,
        };
        let models = match &key.models {
            Some(m) => {
                Some(serde_json::to_string(m).map_err(|e| StoreError::Invalid(e.to_string()))?)
            }
            None => None,
        };
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO api_keys (id, customer_id, name, key_hash, key_prefix, models, rpm, tpm, \
             expires_at, revoked_at, created_at, tags, budget_nano_usd, max_concurrent_requests) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, $10, $11, $12, $13)",
        )
        .bind(&key.id)
        .bind(&key.customer_id)
        .bind(&key.name)
        .bind(key_hash)
        .bind(&key.key_prefix)
        .bind(models)
        .bind(key.rpm)
        .bind(key.tpm)
        .bind(key.expires_at)
        .bind(key.created_at)
        .bind(tags::to_json(&key.tags))
        .bind(key.budget_nano_usd)
        .bind(key.max_concurrent_requests)
        .execute(&mut *tx)
        .await?;
        let change = Change {
            action: Action::KeyCreated,
            target_id: key.id.clone(),
            changes: audited_key(&key),
        };
        audit::record(&mut tx, self.kind, actor, &change).await?;
        tx.commit().await?;
        Ok(key)
    }

    /// Replaces a key's default tags. Returns the key.
    pub async fn set_key_tags(
        &self,
        key_id: &str,
        tags: &Tags,
        actor: &Actor,
    ) -> StoreResult<ApiKey> {
        self.update_key(key_id, KeyChange::Tags(tags), actor).await
    }

    /// Sets or clears (`None`) a key's own monthly budget. Returns the key.
    pub async fn set_key_budget(
        &self,
        key_id: &str,
        budget: Option<i64>,
        actor: &Actor,
    ) -> StoreResult<ApiKey> {
        self.update_key(key_id, KeyChange::Budget(budget), actor)
            .await
    }

    /// Makes `change` to the key in one transaction with its audit entry (when anything
    /// changed). Returns the key as changed.
    async fn update_key(
        &self,
        key_id: &str,
        change: KeyChange<'_>,
        actor: &Actor,
    ) -> StoreResult<ApiKey> {
        let mut tx = self.write_tx().await?;
        let before = key_in(&mut tx, key_id).await?;
        let (statement, action) = match change {
            KeyChange::Tags(tags) => (
                sqlx::query("UPDATE api_keys SET tags = $2 WHERE id = $1")
                    .bind(key_id)
                    .bind(tags::to_json(tags)),
                Action::KeyUpdated,
            ),
            KeyChange::Budget(budget) => (
                sqlx::query("UPDATE api_keys SET budget_nano_usd = $2 WHERE id = $1")
                    .bind(key_id)
                    .bind(budget),
                Action::KeyUpdated,
            ),
            KeyChange::Revoke => (
                sqlx::query(
                    "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(key_id)
                .bind(now_micros()),
                Action::KeyRevoked,
            ),
        };
        statement.execute(&mut *tx).await?;
        let after = key_in(&mut tx, key_id).await?;
        if let Some(changes) = audit::diff(&audited_key(&before), &audited_key(&after)) {
            let entry = Change {
                action,
                target_id: key_id.to_string(),
                changes,
            };
            audit::record(&mut tx, self.kind, actor, &entry).await?;
        }
        tx.commit().await?;
        Ok(after)
    }

    /// One key by id.
    pub async fn key(&self, key_id: &str) -> StoreResult<ApiKey> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => api_key(&row),
            None => Err(StoreError::NotFound(format!("no key `{key_id}`"))),
        }
    }

    pub async fn list_keys(&self, customer_id: &str) -> StoreResult<Vec<ApiKey>> {
        self.customer(customer_id).await?;
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE customer_id = $1 ORDER BY created_at, id"
        ))
        .bind(customer_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(api_key)
        .collect()
    }

    /// Revokes a key; revoking twice keeps the first time (and audits only the first).
    /// Returns the key.
    pub async fn revoke_key(&self, key_id: &str, actor: &Actor) -> StoreResult<ApiKey> {
        self.update_key(key_id, KeyChange::Revoke, actor).await
    }

    /// The key whose secret hashes to `key_hash`, with its stored hash, and its customer.
    /// On the request path: fails at once while the database is considered down.
    pub async fn find_key(
        &self,
        key_hash: &str,
    ) -> StoreResult<Option<(ApiKey, String, Customer)>> {
        if self.is_down() {
            return Err(StoreError::Down);
        }
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS}, key_hash FROM api_keys WHERE key_hash = $1"
        ))
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await;
        self.observe(&row);
        let row = row?;
        let Some(row) = row else { return Ok(None) };
        let key = api_key(&row)?;
        let stored: String = row.try_get("key_hash")?;
        let customer = self.customer(&key.customer_id).await?;
        Ok(Some((key, stored, customer)))
    }

    // ---- ledger ----------------------------------------------------------------------------

    /// Inserts records, skipping ids already present. Returns how many were new.
    pub async fn insert_records(&self, records: &[UsageRecord]) -> StoreResult<u64> {
        let mut tx = self.write_tx().await?;
        if self.kind == DbKind::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(LEDGER_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        let postgres = self.kind == DbKind::Postgres;
        let mut inserted = 0;
        // (customer, started_at, cost) of the rows this batch added, for the shared budgets.
        let mut added: Vec<(String, i64, i64)> = Vec::new();
        let chunk_rows = if postgres {
            INSERT_CHUNK
        } else {
            INSERT_CHUNK_SQLITE
        };
        for chunk in records.chunks(chunk_rows) {
            let mut sql = format!("INSERT INTO usage_records ({RECORD_COLUMNS}) VALUES ");
            for i in 0..chunk.len() {
                let base = i * RECORD_PARAMS;
                let params: Vec<String> = (1..=RECORD_PARAMS)
                    .map(|k| format!("${}", base + k))
                    .collect();
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push('(');
                sql.push_str(&params.join(", "));
                sql.push(')');
            }
            sql.push_str(" ON CONFLICT (id) DO NOTHING");
            if postgres {
                sql.push_str(" RETURNING customer_id, key_id, started_at, cost_nano_usd");
            }
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(&r.id)
                    .bind(&r.customer_id)
                    .bind(&r.key_id)
                    .bind(&r.model)
                    .bind(&r.endpoint)
                    .bind(i64::from(r.stream))
                    .bind(&r.status)
                    .bind(&r.finish_reason)
                    .bind(r.input_tokens)
                    .bind(r.output_tokens)
                    .bind(r.started_at)
                    .bind(r.finished_at)
                    .bind(r.ttft_ms)
                    .bind(&r.input_price_per_mtok)
                    .bind(&r.output_price_per_mtok)
                    .bind(r.cost_nano_usd)
                    .bind(r.cached_input_tokens)
                    .bind(&r.cached_input_price_per_mtok)
                    .bind(r.cached_cost_nano_usd)
                    .bind(&r.usage_source)
                    .bind(tags::to_json(&r.tags))
                    .bind(&r.idempotency_key);
            }
            if postgres {
                for row in q.fetch_all(&mut *tx).await? {
                    let started_at: i64 = row.try_get("started_at")?;
                    let cost: i64 = row.try_get("cost_nano_usd")?;
                    let key_id: String = row.try_get("key_id")?;
                    added.push((row.try_get("customer_id")?, started_at, cost));
                    // The key's own spend, for key budgets.
                    added.push((crate::shared_limits::key_scope(&key_id), started_at, cost));
                    inserted += 1;
                }
            } else {
                inserted += q.execute(&mut *tx).await?.rows_affected();
            }
        }
        if postgres {
            // Each record's holds: its customer's (the record id) and its key's.
            let key_holds: Vec<String> = records
                .iter()
                .map(|r| crate::shared_limits::key_hold_id(&r.id))
                .collect();
            let ids: Vec<&str> = records
                .iter()
                .map(|r| r.id.as_str())
                .chain(key_holds.iter().map(String::as_str))
                .collect();
            crate::shared_limits::settle_in_ledger(&mut tx, &added, &ids).await?;
        }
        // Budget alerts the spend crossed, in the same transaction (the outbox).
        crate::alerts::outbox_in_ledger(&mut tx, records).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    /// Cost of a customer's records started at or after `since` (of a key's, for a budget
    /// scope `key:<id>`).
    pub async fn spent_since(&self, customer_id: &str, since: i64) -> StoreResult<i64> {
        let (column, id) = match customer_id.strip_prefix("key:") {
            Some(key_id) => ("key_id", key_id),
            None => ("customer_id", customer_id),
        };
        let row = sqlx::query(&format!(
            "SELECT CAST(COALESCE(SUM(cost_nano_usd), 0) AS BIGINT) AS spent FROM usage_records \
             WHERE {column} = $1 AND started_at >= $2"
        ))
        .bind(id)
        .bind(since)
        .fetch_one(&self.pool)
        .await;
        self.observe(&row);
        let row = row?;
        Ok(row.try_get("spent")?)
    }

    /// Records after `cursor` (a `seq`) in ledger order, and the cursor to continue from.
    pub async fn records_after(
        &self,
        cursor: i64,
        limit: i64,
    ) -> StoreResult<(Vec<UsageRecord>, Option<i64>)> {
        self.records_between(i64::MIN, i64::MAX, cursor, limit)
            .await
    }

    /// Records started in `[start, end)` after `cursor`, in ledger order (for time-range
    /// exports, read page by page).
    pub async fn records_between(
        &self,
        start: i64,
        end: i64,
        cursor: i64,
        limit: i64,
    ) -> StoreResult<(Vec<UsageRecord>, Option<i64>)> {
        let rows = sqlx::query(&format!(
            "SELECT seq, {RECORD_COLUMNS} FROM usage_records \
             WHERE started_at >= $1 AND started_at < $2 AND seq > $3 ORDER BY seq LIMIT $4"
        ))
        .bind(start)
        .bind(end)
        .bind(cursor)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let last = match rows.last() {
            Some(row) => Some(row.try_get::<i64, _>("seq")?),
            None => None,
        };
        let records = rows.iter().map(record).collect::<StoreResult<Vec<_>>>()?;
        Ok((records, last))
    }

    /// Aggregates usage in `filter`, grouped by `group` and optionally by fixed-width time
    /// buckets `(origin, width)` in microseconds.
    pub async fn aggregate(
        &self,
        filter: &UsageFilter,
        group: &[GroupBy],
        buckets: Option<(i64, i64)>,
    ) -> StoreResult<Vec<UsageRow>> {
        const DAY: i64 = 86_400_000_000;
        let mut cols: Vec<String> = Vec::new();
        // Parameters after start and end: the grouped tag's path, then the filters.
        let mut next = 3;
        let mut tag_group = None;
        for g in group {
            match g {
                GroupBy::Tag(key) => {
                    cols.push(format!("{} AS tag_value", tags::sql_value(self.kind, next)));
                    tag_group = Some(key.clone());
                    next += 1;
                }
                GroupBy::Customer => cols.push("customer_id".into()),
                GroupBy::Model => cols.push("model".into()),
                GroupBy::Key => cols.push("key_id".into()),
                GroupBy::Day => cols.push(format!("(started_at / {DAY}) * {DAY} AS bucket_start")),
                GroupBy::Prices => {
                    cols.push("input_price_per_mtok".into());
                    cols.push("output_price_per_mtok".into());
                    cols.push("cached_input_price_per_mtok".into());
                }
            }
        }
        if let Some((origin, width)) = buckets {
            if width <= 0 {
                return Err(StoreError::Invalid("bucket width must be positive".into()));
            }
            cols.push(format!(
                "((started_at - {origin}) / {width}) * {width} + {origin} AS bucket_start"
            ));
        }
        let group_exprs: Vec<String> = cols
            .iter()
            .map(|c| match c.rsplit_once(" AS ") {
                // By its alias: the expression holds a parameter.
                Some((_, "tag_value")) => "tag_value".to_string(),
                Some((expr, _)) => expr.to_string(),
                None => c.clone(),
            })
            .collect();
        let mut sql = String::from("SELECT ");
        for c in &cols {
            sql.push_str(c);
            sql.push_str(", ");
        }
        sql.push_str(
            "CAST(COUNT(*) AS BIGINT) AS requests, \
             CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, \
             CAST(SUM(output_tokens) AS BIGINT) AS output_tokens, \
             CAST(SUM(cost_nano_usd) AS BIGINT) AS cost_nano_usd, \
             CAST(SUM(cached_input_tokens) AS BIGINT) AS cached_input_tokens, \
             CAST(SUM(cached_cost_nano_usd) AS BIGINT) AS cached_cost_nano_usd \
             FROM usage_records WHERE started_at >= $1 AND started_at < $2",
        );
        if filter.customer_id.is_some() {
            sql.push_str(&format!(" AND customer_id = ${next}"));
            next += 1;
        }
        if filter.model.is_some() {
            sql.push_str(&format!(" AND model = ${next}"));
            next += 1;
        }
        if filter.tag.is_some() {
            sql.push_str(&format!(
                " AND {} = ${}",
                tags::sql_value(self.kind, next),
                next + 1
            ));
        }
        if !group_exprs.is_empty() {
            let list = group_exprs.join(", ");
            sql.push_str(&format!(" GROUP BY {list} ORDER BY {list}"));
        }
        let mut q = sqlx::query(&sql).bind(filter.start).bind(filter.end);
        if let Some(path) = tag_group {
            q = q.bind(path);
        }
        if let Some(c) = &filter.customer_id {
            q = q.bind(c);
        }
        if let Some(m) = &filter.model {
            q = q.bind(m);
        }
        if let Some((key, value)) = &filter.tag {
            q = q.bind(key.clone()).bind(value);
        }
        let rows = q.fetch_all(&self.pool).await?;
        let has = |g: GroupBy| group.contains(&g);
        let has_tag = group.iter().any(|g| matches!(g, GroupBy::Tag(_)));
        rows.iter()
            .map(|row| {
                let requests: i64 = row.try_get("requests")?;
                Ok(UsageRow {
                    customer_id: if has(GroupBy::Customer) {
                        row.try_get("customer_id")?
                    } else {
                        None
                    },
                    model: if has(GroupBy::Model) {
                        row.try_get("model")?
                    } else {
                        None
                    },
                    key_id: if has(GroupBy::Key) {
                        row.try_get("key_id")?
                    } else {
                        None
                    },
                    bucket_start: if has(GroupBy::Day) || buckets.is_some() {
                        row.try_get("bucket_start")?
                    } else {
                        None
                    },
                    tag_value: if has_tag {
                        row.try_get("tag_value")?
                    } else {
                        None
                    },
                    input_price_per_mtok: if has(GroupBy::Prices) {
                        row.try_get("input_price_per_mtok")?
                    } else {
                        None
                    },
                    output_price_per_mtok: if has(GroupBy::Prices) {
                        row.try_get("output_price_per_mtok")?
                    } else {
                        None
                    },
                    cached_input_price_per_mtok: if has(GroupBy::Prices) {
                        row.try_get("cached_input_price_per_mtok")?
                    } else {
                        None
                    },
                    requests,
                    // SUM over no rows is NULL.
                    input_tokens: row.try_get::<Option<i64>, _>("input_tokens")?.unwrap_or(0),
                    output_tokens: row.try_get::<Option<i64>, _>("output_tokens")?.unwrap_or(0),
                    cost_nano_usd: row.try_get::<Option<i64>, _>("cost_nano_usd")?.unwrap_or(0),
                    cached_input_tokens: row
                        .try_get::<Option<i64>, _>("cached_input_tokens")?
                        .unwrap_or(0),
                    cached_cost_nano_usd: row
                        .try_get::<Option<i64>, _>("cached_cost_nano_usd")?
                        .unwrap_or(0),
                })
            })
            .filter(|r: &StoreResult<UsageRow>| r.as_ref().map_or(true, |r| r.requests > 0))
            .collect()
    }
}
