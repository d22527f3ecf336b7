//! The `files` table: what the Files API knows of each file (owner, name, purpose, size, line
//! count, expiry) and the per-customer storage quota it adds up to. The bytes are not here:
//! the gateway keeps them in an object store under the file's id. An expired file is never
//! returned nor counted, and [`Store::expired_files`] lists them for the sweep that deletes
//! bytes and row.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{DbKind, Store, StoreResult};

/// One file's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow {
    /// `file-…`: time-ordered, so the id is also the list order.
    pub id: String,
    pub customer_id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub lines: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<i64>,
}

/// The order of a list: by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListOrder {
    Asc,
    Desc,
}

/// A page of a customer's files.
#[derive(Debug, Clone)]
pub struct FileQuery<'a> {
    pub customer_id: &'a str,
    /// Unix seconds: files expired by then are left out.
    pub now: i64,
    pub purpose: Option<&'a str>,
    /// The id the page starts after.
    pub after: Option<&'a str>,
    pub limit: u32,
    pub order: ListOrder,
}

/// A file refused because the customer's files would then exceed the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverQuota {
    /// Bytes the customer's unexpired files use already.
    pub used: i64,
}

/// Serializes quota checks of concurrent uploads on PostgreSQL (SQLite's write lock does it
/// there).
const FILES_LOCK: i64 = 0x746f_6c6c_6669_6c65;

const COLUMNS: &str = "id, customer_id, filename, purpose, bytes, lines, created_at, expires_at";

fn row(r: &AnyRow) -> StoreResult<FileRow> {
    Ok(FileRow {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        filename: r.try_get("filename")?,
        purpose: r.try_get("purpose")?,
        bytes: r.try_get("bytes")?,
        lines: r.try_get("lines")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
    })
}

impl Store {
    /// Bytes of the customer's files not expired at `now`.
    pub async fn file_bytes_used(&self, customer_id: &str, now: i64) -> StoreResult<i64> {
        let used: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(SUM(bytes) AS BIGINT) FROM files \
             WHERE customer_id = $1 AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(customer_id)
        .bind(now)
        .fetch_one(self.pool())
        .await?;
        Ok(used.unwrap_or(0))
    }

    /// Adds `file` unless its owner's unexpired files (at its `created_at`) and it would then
    /// exceed `quota` bytes. The check and the insert are one transaction, serialized against
    /// other uploads.
    pub async fn insert_file(
        &self,
        file: &FileRow,
        quota: i64,
    ) -> StoreResult<Result<(), OverQuota>> {
        let mut tx = self.write_tx().await?;
        if self.kind() == DbKind::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(FILES_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        let used: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(SUM(bytes) AS BIGINT) FROM files \
             WHERE customer_id = $1 AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(&file.customer_id)
        .bind(file.created_at)
        .fetch_one(&mut *tx)
        .await?;
        let used = used.unwrap_or(0);
        if used.saturating_add(file.bytes) > quota {
            return Ok(Err(OverQuota { used }));
        }
        sqlx::query(&format!(
            "INSERT INTO files ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&file.id)
        .bind(&file.customer_id)
        .bind(&file.filename)
        .bind(&file.purpose)
        .bind(file.bytes)
        .bind(file.lines)
        .bind(file.created_at)
        .bind(file.expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// The customer's file `id`, unless it has expired by `now`.
    pub async fn file(
        &self,
        id: &str,
        customer_id: &str,
        now: i64,
    ) -> StoreResult<Option<FileRow>> {
        let r = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM files WHERE id = $1 AND customer_id = $2 \
             AND (expires_at IS NULL OR expires_at > $3)"
        ))
        .bind(id)
        .bind(customer_id)
        .bind(now)
        .fetch_optional(self.pool())
        .await?;
        r.as_ref().map(row).transpose()
    }

    /// A page of the customer's unexpired files, and whether more follow it.
    pub async fn files(&self, q: &FileQuery<'_>) -> StoreResult<(Vec<FileRow>, bool)> {
        let (cmp, dir) = match q.order {
            ListOrder::Asc => (">", "ASC"),
            ListOrder::Desc => ("<", "DESC"),
        };
        let mut sql = format!(
            "SELECT {COLUMNS} FROM files WHERE customer_id = $1 \
             AND (expires_at IS NULL OR expires_at > $2)"
        );
        let mut n = 2;
        if q.purpose.is_some() {
            n += 1;
            sql.push_str(&format!(" AND purpose = ${n}"));
        }
        if q.after.is_some() {
            n += 1;
            sql.push_str(&format!(" AND id {cmp} ${n}"));
        }
        sql.push_str(&format!(
            " ORDER BY id {dir} LIMIT {}",
            u64::from(q.limit) + 1
        ));
        let mut query = sqlx::query(&sql).bind(q.customer_id).bind(q.now);
        if let Some(p) = q.purpose {
            query = query.bind(p);
        }
        if let Some(a) = q.after {
            query = query.bind(a);
        }
        let rows = query.fetch_all(self.pool()).await?;
        let mut files = rows.iter().map(row).collect::<StoreResult<Vec<_>>>()?;
        let more = files.len() > q.limit as usize;
        files.truncate(q.limit as usize);
        Ok((files, more))
    }

    /// Deletes the customer's file `id`'s row; whether there was one.
    pub async fn delete_file(&self, id: &str, customer_id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM files WHERE id = $1 AND customer_id = $2")
            .bind(id)
            .bind(customer_id)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Up to `limit` ids of files expired at `now`, oldest expiry first: the sweep deletes
    /// their bytes, then [`Store::forget_file`] their rows.
    pub async fn expired_files(&self, now: i64, limit: u32) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= $1 \
             ORDER BY expires_at, id LIMIT {limit}"
        ))
        .bind(now)
        .fetch_all(self.pool())
        .await?)
    }

    /// Deletes file `id`'s row, whoever owns it (the expiry sweep).
    pub async fn forget_file(&self, id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
