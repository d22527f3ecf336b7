-- Idempotency-Key: one row per (customer, key) for 24 hours. `request_hash` is the SHA-256 of
-- the route and the raw body, so the same key with another body is refused; `request_id` is the
-- first request's id (its usage record). While `state` is 'running' the row is leased until
-- `lease_until` (Unix microseconds), renewed by the gateway running it, so a gateway that died
-- mid-request leaves a key another may take over; once 'done' it holds the response to replay
-- (status, content type, body: JSON or the SSE events as sent).
CREATE TABLE idempotency_keys (
    customer_id     TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    state           TEXT NOT NULL,
    status_code     BIGINT,
    content_type    TEXT,
    body            TEXT,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    lease_until     BIGINT NOT NULL,
    PRIMARY KEY (customer_id, idempotency_key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
-- The Idempotency-Key a record's request carried (NULL: none).
ALTER TABLE usage_records ADD COLUMN idempotency_key TEXT;
