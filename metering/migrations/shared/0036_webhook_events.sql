-- The outbox of the customer's webhook events other than budget alerts: the ends of batches and
-- of background responses (`batch.completed`, `response.failed`, ...), delivered with the
-- Standard Webhooks headers. `id` derives from the object and the event type, so the replica
-- that ends an object adds its event once whatever others do. `payload` is the event as
-- delivered; `status`, `attempts`, `next_attempt_at`, `delivered_at` and `last_error` as in
-- `budget_alerts`, drained by the same deliverer.
CREATE TABLE webhook_events (
    id              TEXT PRIMARY KEY,
    customer_id     TEXT NOT NULL,
    type            TEXT NOT NULL,
    object_id       TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    delivered_at    BIGINT,
    last_error      TEXT
);
CREATE INDEX webhook_events_due ON webhook_events (status, next_attempt_at);
CREATE INDEX webhook_events_customer ON webhook_events (customer_id, created_at);
