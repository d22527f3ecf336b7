-- Cost-allocation tags: a JSON object of string pairs (NULL when none). On a record, the
-- request's `metadata` and `user` merged with its key's default tags; on a key, its defaults.
ALTER TABLE usage_records ADD COLUMN tags TEXT;
ALTER TABLE api_keys ADD COLUMN tags TEXT;
