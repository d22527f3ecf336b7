//! Reserved capacity (provisioned throughput): a customer's tokens per minute on a model over
//! a span of time, and the rule that a model is never oversold — at no moment does the sum of
//! its reservations exceed its capacity. The check and the insert run in one serialized
//! transaction (PostgreSQL's advisory lock, SQLite's write lock), so two concurrent creations
//! cannot both pass it. What a reservation costs is `crate::billing`'s; what a request may
//! spend of it this minute is `crate::limits::reservation`'s.

use rust_decimal::Decimal;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{kind_column, now_micros, DbKind, Store, StoreError, StoreResult};
pub use crate::accounts::Reservation;
use crate::audit::{self, Action, Actor, Change};
use crate::views::ReservationView;

/// Advisory lock id serializing reservation changes on PostgreSQL.
const RESERVATIONS_LOCK: i64 = 0x7265_7365_7276_6564;

const COLUMNS: &str = "id, customer_id, model, reserved_tokens_per_minute, \
    price_per_ktpm_month, starts_at, ends_at, created_at";

/// What creating a reservation takes; the price comes from the model's catalogue entry.
#[derive(Debug, Clone)]
pub struct NewReservation {
    pub customer_id: String,
    pub model: String,
    pub reserved_tokens_per_minute: i64,
    pub price_per_ktpm_month: Decimal,
    /// From `.0` until `.1` (`None`: until ended), in microseconds.
    pub span: (i64, Option<i64>),
}

fn reservation(row: &AnyRow) -> StoreResult<Reservation> {
    let text = |c: &str| row.try_get::<String, _>(c);
    let int = |c: &str| row.try_get::<i64, _>(c);
    Ok(Reservation {
        id: text("id")?,
        customer_id: text("customer_id")?,
        model: text("model")?,
        reserved_tokens_per_minute: int("reserved_tokens_per_minute")?,
        price_per_ktpm_month: kind_column(row, "price_per_ktpm_month")?,
        starts_at: int("starts_at")?,
        ends_at: row.try_get("ends_at")?,
        created_at: int("created_at")?,
    })
}

/// A write transaction that holds the reservations' lock (PostgreSQL's advisory lock; on
/// SQLite the write transaction is the lock).
async fn locked(store: &Store) -> StoreResult<sqlx::Transaction<'static, sqlx::Any>> {
    let mut tx = store.write_tx().await?;
    if store.kind() == DbKind::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(RESERVATIONS_LOCK)
            .execute(&mut *tx)
            .await?;
    }
    Ok(tx)
}

/// The most tokens per minute `held` reserves at one moment of `[start, end)`. The sum only
/// steps up where a reservation starts, so the peak is at `start` or at one of those starts.
pub fn peak_tpm(held: &[Reservation], start: i64, end: Option<i64>) -> i64 {
    let within = |t: i64| t >= start && end.is_none_or(|e| t < e);
    std::iter::once(start)
        .chain(held.iter().map(|r| r.starts_at).filter(|t| within(*t)))
        .map(|t| {
            held.iter().filter(|r| r.active_at(t)).fold(0i64, |sum, r| {
                sum.saturating_add(r.reserved_tokens_per_minute)
            })
        })
        .max()
        .unwrap_or(0)
}

impl Store {
    /// Creates a reservation unless it would take the model's reservations past
    /// `capacity_tpm` at some moment of its span (`Conflict`, naming what is left).
    pub async fn create_reservation(
        &self,
        new: &NewReservation,
        capacity_tpm: i64,
        actor: &Actor,
    ) -> StoreResult<Reservation> {
        if new.reserved_tokens_per_minute <= 0 {
            return Err(StoreError::Invalid(format!(
                "reserved_tokens_per_minute {} is not a positive number",
                new.reserved_tokens_per_minute
            )));
        }
        if new.span.1.is_some_and(|e| e <= new.span.0) {
            return Err(StoreError::Invalid(
                "ends_at is not after starts_at".to_string(),
            ));
        }
        self.customer(&new.customer_id).await?;
        let mut tx = locked(self).await?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM reservations WHERE model = $1 \
             AND (ends_at IS NULL OR ends_at > $2)"
        ))
        .bind(&new.model)
        .bind(new.span.0)
        .fetch_all(&mut *tx)
        .await?;
        let held: Vec<Reservation> = rows
            .iter()
            .map(reservation)
            .collect::<StoreResult<Vec<_>>>()?
            .into_iter()
            .filter(|r| r.overlaps(new.span.0, new.span.1))
            .collect();
        let peak = peak_tpm(&held, new.span.0, new.span.1);
        if peak.saturating_add(new.reserved_tokens_per_minute) > capacity_tpm {
            return Err(StoreError::Conflict(format!(
                "model `{}` has {} of its {capacity_tpm} tokens per minute left to reserve \
                 over that span; {} asked",
                new.model,
                (capacity_tpm - peak).max(0),
                new.reserved_tokens_per_minute
            )));
        }
        let created = Reservation {
            id: format!("rsv_{}", uuid::Uuid::now_v7().simple()),
            customer_id: new.customer_id.clone(),
            model: new.model.clone(),
            reserved_tokens_per_minute: new.reserved_tokens_per_minute,
            price_per_ktpm_month: new.price_per_ktpm_month,
            starts_at: new.span.0,
            ends_at: new.span.1,
            created_at: now_micros(),
        };
        sqlx::query(&format!(
            "INSERT INTO reservations ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&created.id)
        .bind(&created.customer_id)
        .bind(&created.model)
        .bind(created.reserved_tokens_per_minute)
        .bind(created.price_per_ktpm_month.to_string())
        .bind(created.starts_at)
        .bind(created.ends_at)
        .bind(created.created_at)
        .execute(&mut *tx)
        .await?;
        let change = Change {
            action: Action::ReservationCreated,
            target_id: created.id.clone(),
            changes: ReservationView::from(&created).audited(),
        };
        audit::record(&mut tx, self.kind(), actor, &change).await?;
        tx.commit().await?;
        Ok(created)
    }

    /// Reservations, oldest first: a customer's, a model's, or all.
    pub async fn reservations(
        &self,
        customer_id: Option<&str>,
        model: Option<&str>,
    ) -> StoreResult<Vec<Reservation>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM reservations \
             WHERE ($1 IS NULL OR customer_id = $1) AND ($2 IS NULL OR model = $2) \
             ORDER BY starts_at, id"
        ))
        .bind(customer_id)
        .bind(model)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(reservation).collect()
    }

    /// Reservations holding capacity at some moment of `[start, end)` (a billing month).
    pub async fn reservations_between(
        &self,
        customer_id: &str,
        start: i64,
        end: i64,
    ) -> StoreResult<Vec<Reservation>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM reservations WHERE customer_id = $1 AND starts_at < $3 \
             AND (ends_at IS NULL OR ends_at > $2) ORDER BY model, starts_at, id"
        ))
        .bind(customer_id)
        .bind(start)
        .bind(end)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(reservation).collect()
    }

    /// One reservation by id.
    pub async fn reservation(&self, id: &str) -> StoreResult<Reservation> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM reservations WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        match row {
            Some(row) => reservation(&row),
            None => Err(StoreError::NotFound(format!("no reservation `{id}`"))),
        }
    }

    /// Ends a reservation at `at` (or at its own end, if that is sooner): billed until then,
    /// its capacity free after. One not started yet ends where it starts (it never held
    /// capacity and bills nothing). Returns it as it now stands.
    pub async fn end_reservation(
        &self,
        id: &str,
        at: i64,
        actor: &Actor,
    ) -> StoreResult<Reservation> {
        let mut tx = locked(self).await?;
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM reservations WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("no reservation `{id}`")));
        };
        let mut r = reservation(&row)?;
        let end = at.max(r.starts_at);
        if r.ends_at.is_some_and(|e| e <= end) {
            return Ok(r);
        }
        let before = r.ends_at;
        r.ends_at = Some(end);
        sqlx::query("UPDATE reservations SET ends_at = $1 WHERE id = $2")
            .bind(end)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let change = Change {
            action: Action::ReservationEnded,
            target_id: r.id.clone(),
            changes: serde_json::json!({"ends_at": {
                "from": before.map(crate::periods::rfc3339),
                "to": crate::periods::rfc3339(end),
            }}),
        };
        audit::record(&mut tx, self.kind(), actor, &change).await?;
        tx.commit().await?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(tpm: i64, starts_at: i64, ends_at: Option<i64>) -> Reservation {
        Reservation {
            id: String::new(),
            customer_id: String::new(),
            model: String::new(),
            reserved_tokens_per_minute: tpm,
            price_per_ktpm_month: Decimal::ZERO,
            starts_at,
            ends_at,
            created_at: 0,
        }
    }

    /// The peak is the most held at one moment, not the sum of all that overlap the span.
    #[test]
    fn the_peak_is_at_a_start() {
        let held = [
            held(100, 0, Some(10)),
            held(50, 10, Some(20)),
            held(30, 15, None),
        ];
        assert_eq!(peak_tpm(&held, 0, None), 100);
        assert_eq!(peak_tpm(&held, 10, Some(15)), 50);
        assert_eq!(peak_tpm(&held, 12, None), 80);
        assert_eq!(peak_tpm(&held, 20, None), 30);
        assert_eq!(peak_tpm(&[], 0, None), 0);
        assert!(held[0].active_at(9) && !held[0].active_at(10));
    }
}
