-- Background responses (`background: true` on /v1/responses): the run of one stored response
-- (its object is the `responses` row of the same id). `request` is the body as accepted (JSON),
-- run as the key `key_id`; `status` is OpenAI's (queued, in_progress, completed, failed,
-- cancelled, incomplete); `lease_until` (Unix seconds) a runner's claim, `attempts` the claims
-- so far (a run stores events and its end only under its own claim); the tokens once it ended.
-- `background_events` keeps the events of its stream as produced, by `sequence_number`, so a
-- client can stream them again from any point.
CREATE TABLE background_responses (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL,
    key_id        TEXT NOT NULL,
    model         TEXT NOT NULL,
    request       TEXT NOT NULL,
    status        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    lease_until   BIGINT,
    attempts      BIGINT NOT NULL DEFAULT 0,
    input_tokens  BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    ended_at      BIGINT
);
CREATE INDEX background_responses_claim ON background_responses (status, lease_until);
CREATE INDEX background_responses_customer ON background_responses (customer_id, created_at);
CREATE TABLE background_events (
    response_id     TEXT NOT NULL,
    sequence_number BIGINT NOT NULL,
    event           TEXT NOT NULL,
    PRIMARY KEY (response_id, sequence_number)
);
