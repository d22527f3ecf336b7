-- One charge per Idempotency-Key, and running month totals for budget alerts.

-- A key's request is charged once: a record of a key that already has a charged record is
-- `superseded` (kept, with its tokens, never charged). Keys charged more than once before this
-- migration keep their first charge; the others are superseded, so the constraint can hold.
UPDATE usage_records SET status = 'superseded', cost_nano_usd = 0, cached_cost_nano_usd = 0
WHERE idempotency_key IS NOT NULL AND status IN ('completed', 'cancelled')
  AND EXISTS (
    SELECT 1 FROM usage_records o
    WHERE o.customer_id = usage_records.customer_id
      AND o.idempotency_key = usage_records.idempotency_key
      AND o.status IN ('completed', 'cancelled')
      AND o.seq < usage_records.seq);
CREATE UNIQUE INDEX usage_records_one_charge_per_key
    ON usage_records (customer_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND status IN ('completed', 'cancelled');

-- Per customer (and per key, scope `key:<key id>`) and UTC month: what its records cost, kept
-- by the ledger in the transaction that inserts them (as on PostgreSQL, where the table also
-- holds budget reservations), so a budget alert reads one row instead of summing the month.
CREATE TABLE customer_spend (
    customer_id    TEXT NOT NULL,
    period_start   BIGINT NOT NULL,
    spent_nano_usd BIGINT NOT NULL,
    held_nano_usd  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (customer_id, period_start)
);
INSERT INTO customer_spend (customer_id, period_start, spent_nano_usd)
SELECT customer_id,
       CAST(strftime('%s', started_at / 1000000, 'unixepoch', 'start of month') AS INTEGER) * 1000000,
       SUM(cost_nano_usd)
FROM usage_records GROUP BY 1, 2;
INSERT INTO customer_spend (customer_id, period_start, spent_nano_usd)
SELECT 'key:' || key_id,
       CAST(strftime('%s', started_at / 1000000, 'unixepoch', 'start of month') AS INTEGER) * 1000000,
       SUM(cost_nano_usd)
FROM usage_records GROUP BY 1, 2;

-- The spend up to which budget alerts were checked. The alert step runs after the records in
-- their transaction but cannot undo them: when it fails, the records commit with this behind
-- `spent_nano_usd`, and the alert is checked again later (the index finds those rows).
ALTER TABLE customer_spend ADD COLUMN alerts_checked_nano_usd BIGINT NOT NULL DEFAULT 0;
UPDATE customer_spend SET alerts_checked_nano_usd = spent_nano_usd;
CREATE INDEX customer_spend_alerts_behind ON customer_spend (customer_id)
    WHERE alerts_checked_nano_usd < spent_nano_usd;
