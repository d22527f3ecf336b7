-- Service tiers per customer and per key: the tier a request asking `service_tier: "auto"`
-- (or nothing) is served at (NULL: the key's falls back to the customer's, the customer's to
-- `default`), and whether `priority` may be asked for (1 = yes). A customer may not by default;
-- a key may by default, so its customer's permission decides until the key narrows it.
ALTER TABLE customers ADD COLUMN default_service_tier TEXT;
ALTER TABLE customers ADD COLUMN allow_priority BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN default_service_tier TEXT;
ALTER TABLE api_keys ADD COLUMN allow_priority BIGINT NOT NULL DEFAULT 1;
