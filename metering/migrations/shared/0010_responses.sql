-- Stored Responses API objects (`store: true`), scoped to the customer that made them and kept
-- until `expires_at` (Unix microseconds). `input_items` is the whole conversation the response
-- answered (earlier responses' turns included), `response` the response object, both JSON.
CREATE TABLE responses (
    id          TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    input_items TEXT NOT NULL,
    response    TEXT NOT NULL
);
CREATE INDEX responses_customer ON responses (customer_id);
CREATE INDEX responses_expiry ON responses (expires_at);
