-- Prompt tokens served from a prefix cache: how many (a part of input_tokens), the unit price
-- they were charged at (NULL on older records: the input price), the part of cost_nano_usd
-- they account for (rounded alone; the rest of the cost is fresh input and output), and where
-- the token counts came from (`engine`, `upstream`, or `observed` when an upstream reported
-- fewer output tokens than the gateway saw; NULL on older records).
ALTER TABLE usage_records ADD COLUMN cached_input_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN cached_input_price_per_mtok TEXT;
ALTER TABLE usage_records ADD COLUMN cached_cost_nano_usd BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN usage_source TEXT;
