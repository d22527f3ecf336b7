//! The customer's webhook: budget alerts (per customer, thresholds as fractions of the monthly
//! budget, default 0.5, 0.8 and 1.0) and the ends of batches and background responses
//! (`tollgate_metering::outbox`), delivered as signed JSON events.
//!
//! At-least-once, from a transactional outbox (migration 0012): the ledger's insert
//! transaction calls `tollgate_metering::alerts::outbox_in_ledger`, which adds a
//! `budget_alerts` row for every threshold the inserted records' spend crossed, so an alert exists exactly when the records that
//! crossed it do (a gateway killed after the spend replays its spool and creates it then), and
//! the table's unique key fires each threshold once per customer and month whatever replica
//! wrote the records. The [`Deliverer`] (one per gateway) claims due rows, POSTs them, and
//! retries with exponential backoff until a 2xx or [`DeliveryConfig::give_up_after`].
//!
//! Signature (README, "Budget alerts"): header `Tollgate-Signature: t=<unix seconds>,v1=<hex>`
//! where `<hex>` is HMAC-SHA256 with the customer's webhook secret over `"<t>.<body>"`; the
//! event's `id` is also sent as `Tollgate-Event-Id` so receivers deduplicate. The other events
//! carry the Standard Webhooks headers instead, as OpenAI's webhooks do: `webhook-id`,
//! `webhook-timestamp` and `webhook-signature` ([`standard_signature`]).
//!
//! It owns the signature and delivery; the SQL, the crossing rule, the event payload and the
//! settings' rules (thresholds, webhook URL, secret) are in `tollgate_metering::alerts`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use tollgate_metering::outbox::{Delivery, Outbox};
use tollgate_metering::secrets::hex;
use tollgate_metering::store::{now_micros, Store};

/// HMAC-SHA256 with `key` over `parts`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return Vec::new();
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// `Tollgate-Signature` for `body` sent at `timestamp` (Unix seconds).
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    let t = timestamp.to_string();
    let mac = hmac(secret.as_bytes(), &[t.as_bytes(), b".", body.as_bytes()]);
    format!("t={timestamp},v1={}", hex(&mac))
}

/// The Standard Webhooks `webhook-signature` (`v1,<base64>`) of event `id` with `body` sent at
/// `timestamp`: HMAC-SHA256 over `"<id>.<timestamp>.<body>"` keyed, as the Standard Webhooks
/// libraries key it, with the base64 decoding of what follows `whsec_` in the secret (a
/// Tollgate secret's 64 hex digits are valid base64: 48 bytes). A secret that does not decode
/// is used as it is.
pub fn standard_signature(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = b64
        .decode(encoded)
        .unwrap_or_else(|_| secret.as_bytes().to_vec());
    let t = timestamp.to_string();
    let mac = hmac(
        &key,
        &[id.as_bytes(), b".", t.as_bytes(), b".", body.as_bytes()],
    );
    format!("v1,{}", b64.encode(mac))
}

/// How deliveries are paced.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryConfig {
    /// How often due alerts are looked for.
    pub poll: Duration,
    /// The first retry's delay; each further one doubles, up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// After this long without a 2xx an alert is marked `failed`.
    pub give_up_after: Duration,
    /// One attempt's limit (connect, send, response head).
    pub timeout: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(500),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            give_up_after: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(10),
        }
    }
}

impl DeliveryConfig {
    /// The delay before attempt `attempts + 1`, after `attempts` failed ones.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let doubled = self
            .backoff_base
            .checked_mul(1u32 << attempts.saturating_sub(1).min(20))
            .unwrap_or(self.backoff_max);
        doubled.min(self.backoff_max)
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 4)
}

/// Delivers due alerts until cancelled.
pub struct Deliverer {
    store: Store,
    client: reqwest::Client,
    config: DeliveryConfig,
}

impl Deliverer {
    pub fn new(store: Store, config: DeliveryConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().timeout(config.timeout).build()?;
        Ok(Self {
            store,
            client,
            config,
        })
    }

    /// Polls for due alerts and delivers them until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            if let Err(e) = self.deliver_due().await {
                tracing::warn!(error = %e, "budget alerts: cannot read the outbox");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.config.poll) => {}
            }
        }
    }

    /// One round: every due delivery of both outboxes this gateway can claim, one attempt
    /// each.
    pub async fn deliver_due(&self) -> tollgate_metering::store::StoreResult<usize> {
        let mut delivered = 0;
        for outbox in Outbox::ALL {
            let due = self.store.due_deliveries(outbox, now_micros(), 50).await?;
            for d in due {
                delivered += usize::from(self.deliver(&d).await?);
            }
        }
        Ok(delivered)
    }

    /// One attempt at `d` if this gateway can claim it; true when it was delivered.
    async fn deliver(&self, d: &Delivery) -> tollgate_metering::store::StoreResult<bool> {
        // Claimed for one attempt's worth of time: another replica skips it meanwhile.
        let lease = now_micros() + micros(self.config.timeout) + 5_000_000;
        if !self.store.claim_delivery(d, lease).await? {
            return Ok(false);
        }
        let outcome = self.attempt(d).await;
        let now = now_micros();
        let attempts = d.attempts.saturating_add(1);
        match outcome {
            Ok(()) => {
                self.store.delivered(d.outbox, &d.id, attempts, now).await?;
                tracing::info!(event = %d.id, customer_id = %d.customer_id, attempts, "webhook event delivered");
                return Ok(true);
            }
            Err(Failure::NoWebhook) => {
                self.store.delivery_without_webhook(d.outbox, &d.id).await?;
            }
            Err(Failure::Attempt(error)) => {
                let give_up = now - d.created_at >= micros(self.config.give_up_after);
                let next = now
                    + micros(
                        self.config
                            .backoff(u32::try_from(attempts).unwrap_or(u32::MAX)),
                    );
                tracing::warn!(event = %d.id, attempts, give_up, "webhook delivery failed: {error}");
                self.store
                    .delivery_failed(d.outbox, &d.id, attempts, next, &error, give_up)
                    .await?;
            }
        }
        Ok(false)
    }

    async fn attempt(&self, d: &Delivery) -> Result<(), Failure> {
        let (Some(url), Some(secret)) = (&d.webhook_url, &d.webhook_secret) else {
            return Err(Failure::NoWebhook);
        };
        let timestamp = now_micros() / 1_000_000;
        let request = self
            .client
            .post(url)
            .header("content-type", "application/json");
        let request = match d.outbox {
            Outbox::BudgetAlerts => request.header("tollgate-event-id", &d.id).header(
                "tollgate-signature",
                signature(secret, timestamp, &d.payload),
            ),
            Outbox::Events => request
                .header("webhook-id", &d.id)
                .header("webhook-timestamp", timestamp.to_string())
                .header(
                    "webhook-signature",
                    standard_signature(secret, &d.id, timestamp, &d.payload),
                ),
        };
        let response = request
            .body(d.payload.clone())
            .send()
            .await
            .map_err(|e| Failure::Attempt(format!("POST {url}: {e}")))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(Failure::Attempt(format!("POST {url}: HTTP {status}")))
        }
    }
}

enum Failure {
    NoWebhook,
    Attempt(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_over_timestamp_and_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let sig = signature("Jefe", 0, "what do ya want for nothing?");
        // The signed text is "0.what do ya want for nothing?", so it differs from the RFC's;
        // check the construction instead against a direct HMAC.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"0.what do ya want for nothing?");
        let v1 = hex(&mac.finalize().into_bytes());
        assert_eq!(sig, format!("t=0,v1={v1}"));
        // And the primitive itself is the RFC's HMAC-SHA256.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// The example of the Standard Webhooks specification (and Svix's documentation).
    #[test]
    fn standard_signatures_match_the_specifications_example() {
        assert_eq!(
            standard_signature(
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                r#"{"test": 2432232314}"#,
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let c = DeliveryConfig {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            ..DeliveryConfig::default()
        };
        let delays: Vec<u64> = (1..=9).map(|a| c.backoff(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(c.backoff(u32::MAX), Duration::from_secs(60));
    }
}
