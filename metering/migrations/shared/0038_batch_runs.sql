-- Running a batch's lines. A batch keeps the key that created it (its lines run as that key)
-- and, once final, its token totals; `lease_until` is a finalizing runner's claim on it. A
-- line keeps its model (for the metrics), its attempts and, once done, its result exactly as
-- its output or error file line shows it (`result`, JSON) with its tokens. A usage record
-- names the batch its request was a line of.
ALTER TABLE batches ADD COLUMN key_id TEXT;
ALTER TABLE batches ADD COLUMN input_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN output_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN lease_until BIGINT;
ALTER TABLE batch_lines ADD COLUMN model TEXT NOT NULL DEFAULT '';
ALTER TABLE batch_lines ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE batch_lines ADD COLUMN result TEXT;
ALTER TABLE batch_lines ADD COLUMN input_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE batch_lines ADD COLUMN output_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE batch_lines ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
CREATE INDEX batch_lines_claim ON batch_lines (state, lease_until);
ALTER TABLE usage_records ADD COLUMN batch_id TEXT;
