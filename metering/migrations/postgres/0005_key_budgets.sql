-- A key's own monthly budget (nano-USD; NULL: none), enforced like its customer's. Its spend is
-- kept in customer_spend under the scope `key:<key id>` (customer ids cannot hold `:`), from
-- now on by the ledger's insert transaction, until now from the records.
ALTER TABLE api_keys ADD COLUMN budget_nano_usd BIGINT;

INSERT INTO customer_spend (customer_id, period_start, spent_nano_usd)
SELECT 'key:' || key_id,
       CAST(EXTRACT(EPOCH FROM date_trunc('month', to_timestamp(started_at / 1000000.0) AT TIME ZONE 'UTC')) * 1000000 AS BIGINT),
       SUM(cost_nano_usd)
FROM usage_records
GROUP BY 1, 2
ON CONFLICT (customer_id, period_start) DO NOTHING;
