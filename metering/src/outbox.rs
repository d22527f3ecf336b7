//! The customer's webhook outboxes and their delivery queue. Two tables hold events to POST to
//! the webhook of the customer's alert settings: `budget_alerts` (migration 0012, written by
//! the ledger's insert transaction, see [`crate::alerts`]) and `webhook_events` (migration
//! 0036: the ends of batches and of background responses, added by [`add_event`]). Both
//! are drained alike by the gateway's deliverer: due rows are claimed for one attempt, then
//! marked delivered, failed (retried later or given up) or without a webhook.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::db::{now_micros, Store, StoreResult};
use crate::kinds::AlertStatus;
use crate::secrets::hex;

/// Which outbox a delivery comes from; they differ in their table and in the headers that
/// sign them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbox {
    /// Budget alerts, signed with `Tollgate-Signature` (kept as they were first documented).
    BudgetAlerts,
    /// The other events, signed with the Standard Webhooks headers.
    Events,
}

impl Outbox {
    pub const ALL: [Outbox; 2] = [Outbox::BudgetAlerts, Outbox::Events];

    fn table(self) -> &'static str {
        match self {
            Outbox::BudgetAlerts => "budget_alerts",
            Outbox::Events => "webhook_events",
        }
    }
}

/// One row of an outbox as the deliverer needs it, with the customer's webhook as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub outbox: Outbox,
    pub id: String,
    pub customer_id: String,
    pub created_at: i64,
    pub payload: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
}

fn delivery(outbox: Outbox, row: &AnyRow) -> StoreResult<Delivery> {
    Ok(Delivery {
        outbox,
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        created_at: row.try_get("created_at")?,
        payload: row.try_get("payload")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        webhook_url: row.try_get("webhook_url")?,
        webhook_secret: row.try_get("webhook_secret")?,
    })
}

/// The kinds of object whose end is an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventObject {
    Batch,
    Response,
}

impl EventObject {
    fn prefix(self) -> &'static str {
        match self {
            EventObject::Batch => "batch",
            EventObject::Response => "response",
        }
    }
}

/// The id of the event of type `<object>.<end>` about `object_id`: the same whoever adds it.
pub fn event_id(object: EventObject, end: &str, object_id: &str) -> String {
    let digest = Sha256::digest(format!("{}.{end}\n{object_id}", object.prefix()).as_bytes());
    format!("evt_{}", &hex(&digest)[..32])
}

/// The event as delivered: OpenAI's webhook event shape (`data.id` names the object).
pub fn event_payload(id: &str, event_type: &str, object_id: &str, created_at: i64) -> Value {
    json!({
        "id": id,
        "object": "event",
        "type": event_type,
        "created_at": created_at / 1_000_000,
        "data": {"id": object_id},
    })
}

/// Adds the event `<object>.<end>` (e.g. `batch.completed`) about `object_id` to
/// `customer_id`'s outbox, once: a second call for the same object and end adds nothing.
/// Called in the transaction that ends the object, so the event exists exactly when the end
/// does. Returns whether it was added. A customer without a webhook gets it as `no_webhook`
/// (kept for the record, never sent).
pub async fn add_event(
    conn: &mut AnyConnection,
    customer_id: &str,
    object: EventObject,
    end: &str,
    object_id: &str,
) -> Result<bool, sqlx::Error> {
    let event_type = format!("{}.{end}", object.prefix());
    let id = event_id(object, end, object_id);
    let now = now_micros();
    let payload = event_payload(&id, &event_type, object_id, now).to_string();
    let webhook: Option<Option<String>> =
        sqlx::query_scalar("SELECT webhook_url FROM alert_settings WHERE customer_id = $1")
            .bind(customer_id)
            .fetch_optional(&mut *conn)
            .await?;
    let status = if webhook.flatten().is_some() {
        AlertStatus::Pending
    } else {
        AlertStatus::NoWebhook
    };
    let done = sqlx::query(
        "INSERT INTO webhook_events (id, customer_id, type, object_id, created_at, payload, \
         status, attempts, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $5) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&id)
    .bind(customer_id)
    .bind(&event_type)
    .bind(object_id)
    .bind(now)
    .bind(&payload)
    .bind(status.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

impl Store {
    /// Pending rows of `outbox` whose next attempt is due, soonest first.
    pub async fn due_deliveries(
        &self,
        outbox: Outbox,
        now: i64,
        limit: i64,
    ) -> StoreResult<Vec<Delivery>> {
        sqlx::query(&format!(
            "SELECT a.id, a.customer_id, a.created_at, a.payload, a.attempts, \
             a.next_attempt_at, s.webhook_url, s.webhook_secret FROM {} a \
             LEFT JOIN alert_settings s ON s.customer_id = a.customer_id \
             WHERE a.status = 'pending' AND a.next_attempt_at <= $1 \
             ORDER BY a.next_attempt_at LIMIT $2",
            outbox.table()
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|row| delivery(outbox, row))
        .collect()
    }

    /// Takes `d` for one attempt (until `lease`); false when another gateway took it.
    pub async fn claim_delivery(&self, d: &Delivery, lease: i64) -> StoreResult<bool> {
        let done = sqlx::query(&format!(
            "UPDATE {} SET next_attempt_at = $3 \
             WHERE id = $1 AND status = 'pending' AND next_attempt_at = $2",
            d.outbox.table()
        ))
        .bind(&d.id)
        .bind(d.next_attempt_at)
        .bind(lease)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn delivered(
        &self,
        outbox: Outbox,
        id: &str,
        attempts: i64,
        now: i64,
    ) -> StoreResult<()> {
        sqlx::query(&format!(
            "UPDATE {} SET status = 'delivered', attempts = $2, delivered_at = $3, \
             last_error = NULL WHERE id = $1",
            outbox.table()
        ))
        .bind(id)
        .bind(attempts)
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// One more failed attempt: retried at `next_attempt_at`, or `failed` when `give_up`.
    pub async fn delivery_failed(
        &self,
        outbox: Outbox,
        id: &str,
        attempts: i64,
        next_attempt_at: i64,
        error: &str,
        give_up: bool,
    ) -> StoreResult<()> {
        sqlx::query(&format!(
            "UPDATE {} SET attempts = $2, next_attempt_at = $3, last_error = $4, \
             status = $5 WHERE id = $1",
            outbox.table()
        ))
        .bind(id)
        .bind(attempts)
        .bind(next_attempt_at)
        .bind(error)
        .bind(
            if give_up {
                AlertStatus::Failed
            } else {
                AlertStatus::Pending
            }
            .as_str(),
        )
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The customer has no webhook (any more): kept, never sent.
    pub async fn delivery_without_webhook(&self, outbox: Outbox, id: &str) -> StoreResult<()> {
        sqlx::query(&format!(
            "UPDATE {} SET status = 'no_webhook' WHERE id = $1",
            outbox.table()
        ))
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// A customer's webhook events, oldest first: `(id, type, object_id, status)`.
    pub async fn webhook_events(
        &self,
        customer_id: &str,
        limit: i64,
    ) -> StoreResult<Vec<(String, String, String, AlertStatus)>> {
        sqlx::query(
            "SELECT id, type, object_id, status FROM webhook_events WHERE customer_id = $1 \
             ORDER BY created_at, id LIMIT $2",
        )
        .bind(customer_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.try_get("id")?,
                row.try_get("type")?,
                row.try_get("object_id")?,
                crate::db::kind_column(row, "status")?,
            ))
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_id_is_the_same_for_its_object_and_end_only() {
        let a = event_id(EventObject::Batch, "completed", "batch_1");
        assert_eq!(a, event_id(EventObject::Batch, "completed", "batch_1"));
        assert_ne!(a, event_id(EventObject::Batch, "failed", "batch_1"));
        assert_ne!(a, event_id(EventObject::Batch, "completed", "batch_2"));
        assert_ne!(a, event_id(EventObject::Response, "completed", "batch_1"));
        assert!(a.starts_with("evt_") && a.len() == 4 + 32);
    }
}
