-- LoRA adapters a customer registered (admin API or CLI): each is the model id
-- `<base_model>:<name>`, seen and usable only by that customer's keys. `path` is the PEFT
-- adapter directory on the servers' disk. A name is unique per customer. Times in Unix
-- microseconds.
CREATE TABLE customer_adapters (
    customer_id TEXT NOT NULL REFERENCES customers (id),
    name        TEXT NOT NULL,
    base_model  TEXT NOT NULL,
    path        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (customer_id, name)
);
-- A request to an adapter's model id (an operator's or a customer's) records its base model
-- and the adapter's name beside `model` (the id requested); NULL for a model's own requests
-- and on older records.
ALTER TABLE usage_records ADD COLUMN base_model TEXT;
ALTER TABLE usage_records ADD COLUMN adapter TEXT;
