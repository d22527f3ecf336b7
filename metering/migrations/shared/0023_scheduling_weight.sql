-- A customer's share of a model's engine when customers compete for it (weighted fair
-- queueing between customers; 1 = an equal share).
ALTER TABLE customers ADD COLUMN scheduling_weight BIGINT NOT NULL DEFAULT 1;
