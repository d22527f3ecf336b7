-- Customers, API keys and the usage ledger. Times are Unix microseconds (UTC); money is
-- integer nano-USD; unit prices are the exact decimal strings from models.toml.
CREATE TABLE customers (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    budget_nano_usd BIGINT,
    budget_period   TEXT NOT NULL DEFAULT 'monthly',
    rpm             BIGINT,
    tpm             BIGINT,
    created_at      BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    key_prefix  TEXT NOT NULL,
    models      TEXT,
    rpm         BIGINT,
    tpm         BIGINT,
    expires_at  BIGINT,
    revoked_at  BIGINT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX api_keys_customer ON api_keys (customer_id);

CREATE TABLE usage_records (
    seq                   INTEGER PRIMARY KEY AUTOINCREMENT,
    id                    TEXT NOT NULL UNIQUE,
    customer_id           TEXT NOT NULL,
    key_id                TEXT NOT NULL,
    model                 TEXT NOT NULL,
    endpoint              TEXT NOT NULL,
    stream                BIGINT NOT NULL,
    status                TEXT NOT NULL,
    finish_reason         TEXT,
    input_tokens          BIGINT NOT NULL,
    output_tokens         BIGINT NOT NULL,
    started_at            BIGINT NOT NULL,
    finished_at           BIGINT NOT NULL,
    ttft_ms               BIGINT,
    input_price_per_mtok  TEXT NOT NULL,
    output_price_per_mtok TEXT NOT NULL,
    cost_nano_usd         BIGINT NOT NULL
);
CREATE INDEX usage_records_customer_time ON usage_records (customer_id, started_at);
CREATE INDEX usage_records_time ON usage_records (started_at);
