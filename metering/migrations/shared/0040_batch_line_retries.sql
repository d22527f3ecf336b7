-- A line whose engine failed it (a worker died under it, a backend error) runs again under a
-- new request id: `retries` counts those runs, so each has a usage record of its own (the
-- failed ones uncharged) while a run repeated after its runner died keeps its id.
ALTER TABLE batch_lines ADD COLUMN retries BIGINT NOT NULL DEFAULT 0;
