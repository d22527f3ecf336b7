-- Budget alerts. Per customer: the webhook alerts are delivered to, the secret they are signed
-- with (HMAC-SHA256; shown once when set), and the thresholds as fractions of the monthly
-- budget (a JSON array of decimal strings; NULL: 0.5, 0.8 and 1.0).
CREATE TABLE alert_settings (
    customer_id    TEXT PRIMARY KEY,
    webhook_url    TEXT,
    webhook_secret TEXT,
    thresholds     TEXT,
    updated_at     BIGINT NOT NULL
);

-- The outbox: one row per customer, month and threshold crossed, inserted by the ledger in the
-- transaction that inserted the records crossing it (so a threshold fires once per period,
-- whichever replica wrote the records, and no alert is lost with a gateway). `payload` is the
-- event as delivered, fixed at creation; `status` is `pending` (to deliver at
-- `next_attempt_at`), `delivered`, `failed` (no 2xx within 24 h) or `no_webhook`.
CREATE TABLE budget_alerts (
    id              TEXT PRIMARY KEY,
    customer_id     TEXT NOT NULL,
    period_start    BIGINT NOT NULL,
    threshold       TEXT NOT NULL,
    budget_nano_usd BIGINT NOT NULL,
    spent_nano_usd  BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    delivered_at    BIGINT,
    last_error      TEXT,
    UNIQUE (customer_id, period_start, threshold)
);
CREATE INDEX budget_alerts_due ON budget_alerts (status, next_attempt_at);
CREATE INDEX budget_alerts_customer ON budget_alerts (customer_id, created_at);
