//! The alert tables (migration 0012): customers' alert settings, and the `budget_alerts`
//! outbox written by the ledger's insert transaction and drained by the deliverer; the
//! settings' rules are in `settings.rs`.

use std::collections::BTreeSet;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::audit::{self, Action, Actor, Change};
use crate::db::{kind_column, now_micros, Store, StoreError, StoreResult};
use crate::kinds::AlertStatus;
use crate::periods::month_bounds;

mod settings;

pub use settings::{
    check_webhook_url, parse_thresholds, update_settings, AlertSettingsView, BudgetAlertView,
    SettingsChange,
};

/// Thresholds when a customer has not chosen any.
pub const DEFAULT_THRESHOLDS: [&str; 3] = ["0.5", "0.8", "1.0"];

/// The thresholds `spent` has reached of `budget` (both nano-USD): those `t` with
/// `spent >= ceil(t × budget)`. Exact: no floating point.
pub fn crossed(thresholds: &[String], budget: i64, spent: i64) -> Vec<&str> {
    if budget <= 0 {
        return Vec::new();
    }
    thresholds
        .iter()
        .filter(|t| {
            Decimal::from_str(t)
                .ok()
                .and_then(|t| {
                    (t * Decimal::from(budget))
                        .ceil()
                        .to_string()
                        .parse::<i128>()
                        .ok()
                })
                .is_some_and(|limit| i128::from(spent) >= limit)
        })
        .map(String::as_str)
        .collect()
}

/// The event an alert delivers.
pub fn payload(
    id: &str,
    customer_id: &str,
    period_start: i64,
    threshold: &str,
    budget: i64,
    spent: i64,
    created_at: i64,
) -> Value {
    let period = chrono::DateTime::from_timestamp_micros(period_start)
        .map(|t| t.format("%Y-%m").to_string())
        .unwrap_or_default();
    json!({
        "id": id,
        "object": "event",
        "type": "budget.threshold_crossed",
        "created": created_at / 1_000_000,
        "data": {
            "customer_id": customer_id,
            "period": period,
            "period_start": crate::periods::rfc3339(period_start),
            "threshold": threshold,
            "budget_usd": crate::money::format_usd(budget),
            "spent_usd": crate::money::format_usd(spent),
        },
    })
}

/// A customer's alert settings (the secret only when asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    pub customer_id: String,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
    /// Sorted fractions of the monthly budget, as decimal strings.
    pub thresholds: Vec<String>,
}

/// One alert of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub id: String,
    pub customer_id: String,
    pub period_start: i64,
    pub threshold: String,
    pub budget_nano_usd: i64,
    pub spent_nano_usd: i64,
    pub created_at: i64,
    pub payload: String,
    pub status: AlertStatus,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub delivered_at: Option<i64>,
    pub last_error: Option<String>,
    /// The customer's webhook at the time it was read (for delivery).
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<String>,
}

const ALERT_COLUMNS: &str = "a.id, a.customer_id, a.period_start, a.threshold, \
    a.budget_nano_usd, a.spent_nano_usd, a.created_at, a.payload, a.status, a.attempts, \
    a.next_attempt_at, a.delivered_at, a.last_error, s.webhook_url, s.webhook_secret";

fn alert(row: &AnyRow) -> StoreResult<Alert> {
    Ok(Alert {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        period_start: row.try_get("period_start")?,
        threshold: row.try_get("threshold")?,
        budget_nano_usd: row.try_get("budget_nano_usd")?,
        spent_nano_usd: row.try_get("spent_nano_usd")?,
        created_at: row.try_get("created_at")?,
        payload: row.try_get("payload")?,
        status: kind_column(row, "status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        delivered_at: row.try_get("delivered_at")?,
        last_error: row.try_get("last_error")?,
        webhook_url: row.try_get("webhook_url")?,
        webhook_secret: row.try_get("webhook_secret")?,
    })
}

fn thresholds_of(text: Option<String>) -> StoreResult<Vec<String>> {
    match text {
        None => Ok(DEFAULT_THRESHOLDS.iter().map(|s| s.to_string()).collect()),
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| StoreError::Invalid(format!("stored alert thresholds `{json}`: {e}"))),
    }
}

/// In the ledger's insert transaction, after the records and the month totals they added
/// (`(scope, started_at, cost)`, scope a customer or `key:<id>`): for each customer and month
/// the records cost something in, one outbox row per threshold newly reached by the month's
/// total (one row read, whatever the month holds). Replayed records are harmless: a threshold
/// already in the outbox is skipped.
///
/// The step runs in a savepoint: when it fails, it is undone alone, the records commit, and
/// the month's `alerts_checked_nano_usd` stays behind its spend for [`Store::catch_up_alerts`]
/// to retry. Errors only when the savepoint itself cannot be undone (the transaction is lost).
pub async fn outbox_in_ledger(
    conn: &mut AnyConnection,
    added: &[(String, i64, i64)],
) -> Result<(), sqlx::Error> {
    let scopes: BTreeSet<(&str, i64)> = added
        .iter()
        .filter(|(_, _, cost)| *cost > 0)
        .map(|(scope, started_at, _)| (scope.as_str(), month_bounds(*started_at).0))
        .collect();
    if scopes.is_empty() {
        return Ok(());
    }
    sqlx::query("SAVEPOINT budget_alerts")
        .execute(&mut *conn)
        .await?;
    let mut result = Ok(0);
    for (scope, period_start) in &scopes {
        match check_month(conn, scope, *period_start).await {
            Ok(n) => result = result.map(|c| c + n),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    match result {
        Ok(_) => {
            sqlx::query("RELEASE SAVEPOINT budget_alerts")
                .execute(&mut *conn)
                .await?;
        }
        Err(e) => {
            tracing::error!(
                "budget alerts: the alert step failed; the records are kept and the alert is retried: {e}"
            );
            sqlx::query("ROLLBACK TO SAVEPOINT budget_alerts")
                .execute(&mut *conn)
                .await?;
            sqlx::query("RELEASE SAVEPOINT budget_alerts")
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Checks one month of one scope (`key:` scopes have no alerts: only marked checked) against
/// its customer's budget, adds the alerts newly reached to the outbox and marks the month
/// checked up to the spend it read. Returns how many alerts it added.
async fn check_month(
    conn: &mut AnyConnection,
    scope: &str,
    period_start: i64,
) -> Result<usize, sqlx::Error> {
    let row = sqlx::query(
        "SELECT p.spent_nano_usd, c.budget_nano_usd, s.thresholds, s.webhook_url \
         FROM customer_spend p LEFT JOIN customers c ON c.id = p.customer_id \
         LEFT JOIN alert_settings s ON s.customer_id = p.customer_id \
         WHERE p.customer_id = $1 AND p.period_start = $2",
    )
    .bind(scope)
    .bind(period_start)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(0) };
    let spent: i64 = row.try_get("spent_nano_usd")?;
    let created = match row.try_get::<Option<i64>, _>("budget_nano_usd")? {
        Some(budget) => match thresholds_of(row.try_get("thresholds")?) {
            Ok(thresholds) => {
                let has_webhook = row.try_get::<Option<String>, _>("webhook_url")?.is_some();
                let month = Month {
                    customer_id: scope,
                    period_start,
                    budget,
                    spent,
                };
                add_alerts(conn, &month, &thresholds, has_webhook).await?
            }
            Err(e) => {
                tracing::error!(customer_id = scope, "budget alerts skipped: {e}");
                0
            }
        },
        None => 0,
    };
    sqlx::query(
        "UPDATE customer_spend SET alerts_checked_nano_usd = $3 \
         WHERE customer_id = $1 AND period_start = $2 AND alerts_checked_nano_usd < $3",
    )
    .bind(scope)
    .bind(period_start)
    .bind(spent)
    .execute(&mut *conn)
    .await?;
    Ok(created)
}

/// A customer's month as an alert sees it.
struct Month<'a> {
    customer_id: &'a str,
    period_start: i64,
    budget: i64,
    spent: i64,
}

/// One outbox row per threshold of `thresholds` the month reached and has no alert for.
async fn add_alerts(
    conn: &mut AnyConnection,
    m: &Month<'_>,
    thresholds: &[String],
    has_webhook: bool,
) -> Result<usize, sqlx::Error> {
    let reached = crossed(thresholds, m.budget, m.spent);
    if reached.is_empty() {
        return Ok(0);
    }
    let fired: BTreeSet<String> = sqlx::query(
        "SELECT threshold FROM budget_alerts WHERE customer_id = $1 AND period_start = $2",
    )
    .bind(m.customer_id)
    .bind(m.period_start)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| r.try_get::<String, _>("threshold"))
    .collect::<Result<_, _>>()?;
    let now = now_micros();
    let mut created = 0;
    for threshold in reached.into_iter().filter(|t| !fired.contains(*t)) {
        let id = format!("evt_{}", uuid::Uuid::now_v7().simple());
        let body = payload(
            &id,
            m.customer_id,
            m.period_start,
            threshold,
            m.budget,
            m.spent,
            now,
        )
        .to_string();
        let status = if has_webhook {
            AlertStatus::Pending
        } else {
            AlertStatus::NoWebhook
        };
        let done = sqlx::query(
            "INSERT INTO budget_alerts (id, customer_id, period_start, threshold, \
             budget_nano_usd, spent_nano_usd, created_at, payload, status, attempts, \
             next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $7) \
             ON CONFLICT (customer_id, period_start, threshold) DO NOTHING",
        )
        .bind(&id)
        .bind(m.customer_id)
        .bind(m.period_start)
        .bind(threshold)
        .bind(m.budget)
        .bind(m.spent)
        .bind(now)
        .bind(&body)
        .bind(status.as_str())
        .execute(&mut *conn)
        .await?;
        created += usize::try_from(done.rows_affected()).unwrap_or(usize::MAX);
    }
    Ok(created)
}

impl Store {
    /// Retries the alert step of months whose records committed without it (it failed in the
    /// ledger's transaction): up to 100 of them, each in its own transaction. Returns how many
    /// alerts it added. Cheap when nothing is behind (a partial index holds those months).
    pub async fn catch_up_alerts(&self) -> StoreResult<usize> {
        let behind = sqlx::query(
            "SELECT customer_id, period_start FROM customer_spend \
             WHERE alerts_checked_nano_usd < spent_nano_usd LIMIT 100",
        )
        .fetch_all(self.pool())
        .await?;
        let mut created = 0;
        for row in &behind {
            let scope: String = row.try_get("customer_id")?;
            let period_start: i64 = row.try_get("period_start")?;
            let mut tx = self.pool().begin().await?;
            created += check_month(&mut tx, &scope, period_start).await?;
            tx.commit().await?;
        }
        Ok(created)
    }

    /// A customer's alert settings (defaults when it has none), secret included.
    pub async fn alert_settings(&self, customer_id: &str) -> StoreResult<AlertSettings> {
        self.customer(customer_id).await?;
        let row = sqlx::query(
            "SELECT webhook_url, webhook_secret, thresholds FROM alert_settings \
             WHERE customer_id = $1",
        )
        .bind(customer_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(match row {
            Some(row) => AlertSettings {
                customer_id: customer_id.to_string(),
                webhook_url: row.try_get("webhook_url")?,
                webhook_secret: row.try_get("webhook_secret")?,
                thresholds: thresholds_of(row.try_get("thresholds")?)?,
            },
            None => AlertSettings {
                customer_id: customer_id.to_string(),
                webhook_url: None,
                webhook_secret: None,
                thresholds: thresholds_of(None)?,
            },
        })
    }

    /// Replaces a customer's alert settings, recording in the audit log what changed (a new
    /// secret only as `webhook_secret_issued`, never its value).
    pub async fn set_alert_settings(
        &self,
        s: &AlertSettings,
        secret_issued: bool,
        actor: &Actor,
    ) -> StoreResult<()> {
        let before = self.alert_settings(&s.customer_id).await?;
        let thresholds =
            serde_json::to_string(&s.thresholds).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO alert_settings (customer_id, webhook_url, webhook_secret, thresholds, \
             updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (customer_id) DO UPDATE SET webhook_url = $2, webhook_secret = $3, \
             thresholds = $4, updated_at = $5",
        )
        .bind(&s.customer_id)
        .bind(&s.webhook_url)
        .bind(&s.webhook_secret)
        .bind(thresholds)
        .bind(now_micros())
        .execute(&mut *tx)
        .await?;
        let audited = |s: &AlertSettings| serde_json::json!({"webhook_url": s.webhook_url, "thresholds": s.thresholds});
        let mut changes =
            audit::diff(&audited(&before), &audited(s)).unwrap_or_else(|| serde_json::json!({}));
        if secret_issued {
            changes["webhook_secret_issued"] = serde_json::json!(true);
        }
        if changes.as_object().is_some_and(|c| !c.is_empty()) {
            let change = Change {
                action: Action::AlertSettingsUpdated,
                target_id: s.customer_id.clone(),
                changes,
            };
            audit::record(&mut tx, self.kind(), actor, &change).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Alerts, oldest first, optionally of one customer.
    pub async fn list_alerts(
        &self,
        customer_id: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<Alert>> {
        let filter = if customer_id.is_some() {
            "WHERE a.customer_id = $2"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {ALERT_COLUMNS} FROM budget_alerts a \
             LEFT JOIN alert_settings s ON s.customer_id = a.customer_id {filter} \
             ORDER BY a.created_at, a.id LIMIT $1"
        );
        let mut q = sqlx::query(&sql).bind(limit);
        if let Some(c) = customer_id {
            q = q.bind(c);
        }
        q.fetch_all(self.pool()).await?.iter().map(alert).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn crossing_is_exact_to_the_nano_dollar() {
        let t = strings(&DEFAULT_THRESHOLDS);
        // Budget 1001 nano-USD: half is 500.5, so 501 is needed.
        assert!(crossed(&t, 1001, 500).is_empty());
        assert_eq!(crossed(&t, 1001, 501), ["0.5"]);
        assert_eq!(crossed(&t, 1001, 801), ["0.5", "0.8"]);
        assert_eq!(crossed(&t, 1001, 1000), ["0.5", "0.8"]);
        assert_eq!(crossed(&t, 1001, 1001), ["0.5", "0.8", "1.0"]);
        assert!(crossed(&t, 0, 10).is_empty(), "no budget, no alert");
    }
}
