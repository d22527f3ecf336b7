//! The database behind the store: SQLite (a file, no setup) or PostgreSQL, chosen by the URL,
//! through sqlx's `Any` driver; the connection, its health (a database that cannot be reached
//! is skipped for a moment), the migrations (`migrations.rs`), the store's error type and the
//! column helpers every table's queries share.
//!
//! Portable on purpose: times are Unix microseconds (`BIGINT`), money is integer nano-USD,
//! booleans are 0/1, placeholders are `$N`. The migrations both backends run alike are in
//! `migrations/shared`, the ones written for one in `migrations/sqlite` and `migrations/postgres`.
//!
//! It is the bottom of the crate's tables: the queries, by table, are in `crate::store`,
//! `crate::audit` and `crate::alerts`, and none of them is imported here.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

mod migrations;

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

/// A connection pool to the ledger database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    kind: DbKind,
    /// Until when (Unix micros) request-path lookups skip the database after it could not be
    /// reached, so requests are served from caches at once instead of each waiting for a
    /// connection; the first lookup after that probes it again.
    down_until: Arc<AtomicI64>,
    /// Database work started in the background (the probe of a down database, the shared
    /// limits' follow-ups of a settlement): run on the runtime the store was opened on, even
    /// when started from a thread outside it, and waited for by [`Store::close`].
    background: TaskTracker,
    runtime: tokio::runtime::Handle,
}

/// How long [`Store::close`] waits for background work.
const BACKGROUND_STOP: std::time::Duration = std::time::Duration::from_secs(5);

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

/// A text column holding one of a closed vocabulary ([`crate::kinds`]) or an exact decimal
/// (a unit price); a value that does not parse is a decode error naming the column, never a
/// default.
pub(crate) fn kind_column<T>(row: &AnyRow, column: &str) -> StoreResult<T>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text: String = row.try_get(column)?;
    text.parse().map_err(|e| {
        StoreError::Db(sqlx::Error::ColumnDecode {
            index: column.to_string(),
            source: Box::new(e),
        })
    })
}

/// [`kind_column`] of a nullable column.
pub(crate) fn optional_kind_column<T>(row: &AnyRow, column: &str) -> StoreResult<Option<T>>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    row.try_get::<Option<String>, _>(column)?
        .map(|_| kind_column(row, column))
        .transpose()
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
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
        migrations::run(&pool, kind).await?;
        Ok(Self {
            pool,
            kind,
            down_until: Arc::default(),
            background: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
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
            self.spawn_background(async move {
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

    /// Runs `task` in the background, tracked: [`Store::close`] waits for it.
    pub fn spawn_background(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.background.spawn_on(task, &self.runtime);
    }

    /// Waits (for a few seconds at most) for the background work, then closes the pool.
    pub async fn close(&self) {
        self.background.close();
        if tokio::time::timeout(BACKGROUND_STOP, self.background.wait())
            .await
            .is_err()
        {
            tracing::warn!("database work still running at shutdown was dropped");
        }
        self.pool.close().await;
    }
}
