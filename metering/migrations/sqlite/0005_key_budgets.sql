-- A key's own monthly budget (nano-USD; NULL: none), enforced like its customer's.
ALTER TABLE api_keys ADD COLUMN budget_nano_usd BIGINT;
