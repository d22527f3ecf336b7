//! A customer's alert settings as operators change them (through the admin API or the CLI):
//! the thresholds' rule, the webhook URL's check, the secret made when a webhook is first set
//! (or rotated), and the views the admin API and the CLI show of settings and alerts
//! (described by the same types in the OpenAPI document).

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{Alert, AlertSettings};
use crate::audit::Actor;
use crate::db::{Store, StoreError, StoreResult};
use crate::kinds::AlertStatus;
use crate::money::format_usd;
use crate::periods::rfc3339;
use crate::secrets::new_webhook_secret;

/// Parses thresholds: 1 to 10 distinct fractions in (0, 1], returned sorted and normalized
/// (`"0.50"` → `"0.5"`).
pub fn parse_thresholds(values: &[String]) -> Result<Vec<String>, String> {
    if values.is_empty() || values.len() > 10 {
        return Err(format!("give 1 to 10 thresholds, not {}", values.len()));
    }
    let mut parsed: Vec<Decimal> = Vec::with_capacity(values.len());
    for v in values {
        let d = Decimal::from_str(v.trim())
            .map_err(|_| format!("threshold `{v}` is not a decimal number"))?;
        if d <= Decimal::ZERO || d > Decimal::ONE {
            return Err(format!(
                "threshold `{v}` is not a fraction of the budget in (0, 1]"
            ));
        }
        parsed.push(d.normalize());
    }
    parsed.sort();
    parsed.dedup();
    Ok(parsed
        .iter()
        .map(|d| {
            let s = d.to_string();
            if s.contains('.') {
                s
            } else {
                format!("{s}.0")
            }
        })
        .collect())
}

/// A change of a customer's alert settings.
#[derive(Debug, Clone, Default)]
pub struct SettingsChange {
    /// `Some(None)` removes the webhook (and its secret).
    pub webhook_url: Option<Option<String>>,
    pub thresholds: Option<Vec<String>>,
    /// A new secret even if one exists.
    pub rotate_secret: bool,
}

/// Checks a webhook URL: absolute `http` or `https`.
pub fn check_webhook_url(url: &str) -> Result<(), String> {
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(()),
        Ok(u) => Err(format!(
            "webhook_url `{url}` must be an http or https URL, not {}",
            u.scheme()
        )),
        Err(e) => Err(format!("webhook_url `{url}` is not a URL: {e}")),
    }
}

/// Applies `change` to a customer's settings. Returns them and the new secret when one was
/// made (a webhook set for the first time, or `rotate_secret`): shown once, never again.
pub async fn update_settings(
    store: &Store,
    customer_id: &str,
    change: SettingsChange,
    actor: &Actor,
) -> StoreResult<(AlertSettings, Option<String>)> {
    let mut settings = store.alert_settings(customer_id).await?;
    if let Some(url) = change.webhook_url {
        if let Some(u) = &url {
            check_webhook_url(u).map_err(StoreError::Invalid)?;
        }
        settings.webhook_url = url;
    }
    if let Some(t) = change.thresholds {
        settings.thresholds = parse_thresholds(&t).map_err(StoreError::Invalid)?;
    }
    let mut fresh = None;
    if settings.webhook_url.is_none() {
        settings.webhook_secret = None;
    } else if settings.webhook_secret.is_none() || change.rotate_secret {
        let secret = new_webhook_secret();
        settings.webhook_secret = Some(secret.clone());
        fresh = Some(secret);
    }
    store
        .set_alert_settings(&settings, fresh.is_some(), actor)
        .await?;
    Ok((settings, fresh))
}

/// A customer's budget-alert settings (`GET`/`PUT /admin/v1/customers/{id}/alerts`).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = AlertSettings)]
pub struct AlertSettingsView {
    #[schema(value_type = String, pattern = "^alert_settings$")]
    pub object: &'static str,
    pub customer_id: String,
    #[schema(required)]
    pub webhook_url: Option<String>,
    /// Fractions of the budget, as decimal strings (`"0.5"`).
    pub thresholds: Vec<String>,
    pub webhook_secret_set: bool,
    /// The signing secret, only in the answer that made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
}

impl AlertSettingsView {
    /// The settings as the admin API and the CLI show them; a secret just made is shown this
    /// once.
    pub fn new(s: &AlertSettings, new_secret: Option<&str>) -> Self {
        Self {
            object: "alert_settings",
            customer_id: s.customer_id.clone(),
            webhook_url: s.webhook_url.clone(),
            thresholds: s.thresholds.clone(),
            webhook_secret_set: s.webhook_secret.is_some(),
            webhook_secret: new_secret.map(str::to_string),
        }
    }
}

/// A budget threshold crossed, and its webhook delivery.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = BudgetAlert)]
pub struct BudgetAlertView {
    #[schema(value_type = String, pattern = "^budget_alert$")]
    pub object: &'static str,
    pub id: String,
    pub customer_id: String,
    pub period_start: String,
    pub threshold: String,
    pub budget_usd: String,
    pub spent_usd: String,
    pub created_at: String,
    /// `pending`, `delivered`, `failed` or `no_webhook`.
    #[schema(value_type = String)]
    pub status: AlertStatus,
    pub attempts: i64,
    #[schema(required)]
    pub next_attempt_at: Option<String>,
    #[schema(required)]
    pub delivered_at: Option<String>,
    #[schema(required)]
    pub last_error: Option<String>,
    /// The webhook's JSON payload.
    pub event: Value,
}

impl From<&Alert> for BudgetAlertView {
    /// An alert as the admin API lists it: the event and its delivery.
    fn from(a: &Alert) -> Self {
        Self {
            object: "budget_alert",
            id: a.id.clone(),
            customer_id: a.customer_id.clone(),
            period_start: rfc3339(a.period_start),
            threshold: a.threshold.clone(),
            budget_usd: format_usd(a.budget_nano_usd),
            spent_usd: format_usd(a.spent_nano_usd),
            created_at: rfc3339(a.created_at),
            status: a.status,
            attempts: a.attempts,
            next_attempt_at: (a.status == AlertStatus::Pending).then(|| rfc3339(a.next_attempt_at)),
            delivered_at: a.delivered_at.map(rfc3339),
            last_error: a.last_error.clone(),
            event: serde_json::from_str::<Value>(&a.payload).unwrap_or(Value::Null),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn thresholds_are_fractions_sorted_and_distinct() {
        assert_eq!(
            parse_thresholds(&strings(&["1", "0.50", "0.8", "0.5"])).unwrap(),
            ["0.5", "0.8", "1.0"]
        );
        for bad in [&["0"][..], &["1.01"], &["-0.5"], &["half"], &[]] {
            assert!(parse_thresholds(&strings(bad)).is_err(), "{bad:?}");
        }
    }
}
