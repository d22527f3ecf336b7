-- OpenAI's Predicted Outputs: the tokens of a request's `prediction` verified and kept
-- (accepted: a part of output_tokens, charged as output) and verified and thrown away
-- (rejected: not in output_tokens, charged beside it), the unit price the rejected ones were
-- charged at (NULL on older records, which have none), and the part of cost_nano_usd they
-- account for (rounded alone, like the cached part).
ALTER TABLE usage_records ADD COLUMN accepted_prediction_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN rejected_prediction_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN rejected_prediction_price_per_mtok TEXT;
ALTER TABLE usage_records ADD COLUMN rejected_prediction_cost_nano_usd BIGINT NOT NULL DEFAULT 0;
