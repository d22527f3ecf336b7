-- One charge per Idempotency-Key, and the spend budget alerts were checked to.

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

-- The spend up to which budget alerts were checked. The alert step runs after the records in
-- their transaction but cannot undo them: when it fails, the records commit with this behind
-- `spent_nano_usd`, and the alert is checked again later (the index finds those rows).
ALTER TABLE customer_spend ADD COLUMN alerts_checked_nano_usd BIGINT NOT NULL DEFAULT 0;
UPDATE customer_spend SET alerts_checked_nano_usd = spent_nano_usd;
CREATE INDEX customer_spend_alerts_behind ON customer_spend (customer_id)
    WHERE alerts_checked_nano_usd < spent_nano_usd;
