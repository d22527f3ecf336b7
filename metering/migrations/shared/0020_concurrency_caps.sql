-- Caps on a customer's and a key's requests in flight at once (NULL: no cap); a request beyond
-- them is refused with 429.
ALTER TABLE customers ADD COLUMN max_concurrent_requests BIGINT;
ALTER TABLE api_keys ADD COLUMN max_concurrent_requests BIGINT;
