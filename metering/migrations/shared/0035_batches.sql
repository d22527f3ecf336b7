-- Batches of the Batch API (`POST /v1/batches`), owned by the customer whose key made them, and
-- their lines. Times are Unix seconds; a lifecycle time is NULL until the batch gets there.
-- `errors` is the JSON list of the validation's errors (each with its line), `metadata` the
-- request's JSON object. A batch's lines are written once it is validated; `state` is a line's
-- progress (`queued`, `running`, `completed`, `failed`, `expired`, `cancelled`) and `lease_until`
-- the time a runner's claim on it lapses.
CREATE TABLE batches (
    id                TEXT PRIMARY KEY,
    customer_id       TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    input_file_id     TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status            TEXT NOT NULL,
    metadata          TEXT,
    errors            TEXT,
    output_file_id    TEXT,
    error_file_id     TEXT,
    total             BIGINT NOT NULL DEFAULT 0,
    completed         BIGINT NOT NULL DEFAULT 0,
    failed            BIGINT NOT NULL DEFAULT 0,
    created_at        BIGINT NOT NULL,
    expires_at        BIGINT NOT NULL,
    in_progress_at    BIGINT,
    finalizing_at     BIGINT,
    completed_at      BIGINT,
    failed_at         BIGINT,
    expired_at        BIGINT,
    cancelling_at     BIGINT,
    cancelled_at      BIGINT
);
CREATE INDEX batches_customer ON batches (customer_id, id);
CREATE INDEX batches_status ON batches (status);

CREATE TABLE batch_lines (
    batch_id    TEXT NOT NULL,
    line        BIGINT NOT NULL,
    custom_id   TEXT NOT NULL,
    body        TEXT NOT NULL,
    state       TEXT NOT NULL,
    lease_until BIGINT,
    PRIMARY KEY (batch_id, line)
);
CREATE UNIQUE INDEX batch_lines_custom_id ON batch_lines (batch_id, custom_id);
CREATE INDEX batch_lines_state ON batch_lines (batch_id, state);
