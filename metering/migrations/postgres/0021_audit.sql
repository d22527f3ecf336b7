-- The audit log: every change to customers and keys, written in the change's own transaction.
-- `changes` is JSON (field values, never secrets); `at` is Unix microseconds.
CREATE TABLE audit_log (
    seq         BIGSERIAL PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    at          BIGINT NOT NULL,
    actor_kind  TEXT NOT NULL,
    actor       TEXT NOT NULL,
    remote_addr TEXT,
    request_id  TEXT,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    changes     TEXT NOT NULL
);
CREATE INDEX audit_log_target ON audit_log (target_type, target_id);
