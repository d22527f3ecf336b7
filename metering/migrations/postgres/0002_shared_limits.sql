-- Rate limits and budgets shared by every gateway replica on this database.

-- One rate bucket per scope (`key:<id>` / `customer:<id>`) and kind (`requests` / `tokens`),
-- kept as a GCRA "theoretical arrival time": a bucket of L per minute is full when
-- tat_us <= now, and each unit taken moves tat_us 60 s / L later; a take is allowed while
-- tat_us stays within 60 s of now.
CREATE TABLE rate_buckets (
    scope  TEXT NOT NULL,
    kind   TEXT NOT NULL,
    tat_us BIGINT NOT NULL,
    PRIMARY KEY (scope, kind)
);

-- Per customer and UTC month: what its records cost (kept by the ledger in the transaction
-- that inserts them) and what its requests in flight hold (the sum of its `budget_holds`).
-- Admission is one conditional upsert: held += max cost while spent + held stays in budget.
CREATE TABLE customer_spend (
    customer_id    TEXT NOT NULL,
    period_start   BIGINT NOT NULL,
    spent_nano_usd BIGINT NOT NULL,
    held_nano_usd  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (customer_id, period_start)
);

INSERT INTO customer_spend (customer_id, period_start, spent_nano_usd)
SELECT customer_id,
       CAST(EXTRACT(EPOCH FROM date_trunc('month', to_timestamp(started_at / 1000000.0) AT TIME ZONE 'UTC')) * 1000000 AS BIGINT),
       SUM(cost_nano_usd)
FROM usage_records
GROUP BY 1, 2;

-- A request's maximum cost, held against its customer's budget from admission until its usage
-- record reaches the ledger (the insert deletes it and takes it off `held_nano_usd`). Expiry
-- covers a replica that vanished with its spool.
CREATE TABLE budget_holds (
    id              TEXT PRIMARY KEY,
    customer_id     TEXT NOT NULL,
    period_start    BIGINT NOT NULL,
    amount_nano_usd BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL
);
CREATE INDEX budget_holds_customer ON budget_holds (customer_id, period_start);
