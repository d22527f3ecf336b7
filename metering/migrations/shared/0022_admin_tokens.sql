-- Scoped admin credentials: only the SHA-256 of the secret is stored, as for client keys.
-- `scopes` is a comma-separated list (usage:read, customers:write, keys:write, admin).
CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    token_prefix TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
