-- The class of service a request was served and priced at (`priority`, `default`, `flex`,
-- `batch`); every record before tiers existed was served at `default`.
ALTER TABLE usage_records ADD COLUMN service_tier TEXT NOT NULL DEFAULT 'default';
