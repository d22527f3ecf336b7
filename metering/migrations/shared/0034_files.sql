-- Files of the Files API (`POST /v1/files`): one row per file, owned by the customer whose key
-- uploaded it. The bytes live in the object store under the file's id; this row is what the
-- API reads back and what the customer's storage quota adds up. Times are Unix seconds (the
-- API's own unit); `expires_at` NULL never expires. `lines` is the JSONL file's line count.
CREATE TABLE files (
    id          TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    lines       BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT
);
CREATE INDEX files_customer ON files (customer_id, id);
CREATE INDEX files_expiry ON files (expires_at);
