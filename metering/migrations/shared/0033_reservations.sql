-- Reserved capacity (provisioned throughput): a customer's tokens per minute on a model,
-- from `starts_at` until `ends_at` (NULL: open-ended), billed per month at the price per
-- 1,000 TPM it was sold at (a decimal string, as the ledger keeps unit prices). Times in Unix
-- microseconds. The sum over a model's reservations at any moment never exceeds the model's
-- `capacity_tpm`: the store checks it and inserts in one serialized transaction.
CREATE TABLE reservations (
    id                         TEXT PRIMARY KEY,
    customer_id                TEXT NOT NULL REFERENCES customers (id),
    model                      TEXT NOT NULL,
    reserved_tokens_per_minute BIGINT NOT NULL,
    price_per_ktpm_month       TEXT NOT NULL,
    starts_at                  BIGINT NOT NULL,
    ends_at                    BIGINT,
    created_at                 BIGINT NOT NULL
);
CREATE INDEX reservations_model ON reservations (model, starts_at);
CREATE INDEX reservations_customer ON reservations (customer_id, starts_at);
