//! The end of a batch whose lines are all done: its output file (the lines that completed)
//! and its error file (the lines that failed, expired or were cancelled), purpose
//! `batch_output`, owned by the batch's customer and written through the Files API's
//! storage; then the batch is `completed`, `expired` or `cancelled` with their ids, counts and
//! tokens. A file with no line is not written (its id stays null). A runner that dies while
//! writing leaves the batch claimed until its lease lapses; another then writes it again.

use bytes::Bytes;
use serde_json::json;
use tollgate_metering::kinds::LineState;
use tollgate_metering::store::{FileRow, LineOutcome, Store};

use super::line::request_id;
use crate::files::{unix_now, FileStorage, Upload};

/// Lines read from the database at a time.
const PAGE: u32 = 500;

/// One file being written.
struct Output {
    id: String,
    upload: Upload,
    bytes: i64,
    lines: i64,
}

impl Output {
    fn new(files: &FileStorage) -> Self {
        let id = format!("file-{}", uuid::Uuid::now_v7().simple());
        Self {
            upload: files.upload(&id),
            id,
            bytes: 0,
            lines: 0,
        }
    }

    async fn push(&mut self, line: String) -> anyhow::Result<()> {
        let mut line = line.into_bytes();
        line.push(b'\n');
        self.bytes += i64::try_from(line.len())?;
        self.lines += 1;
        self.upload.write(Bytes::from(line)).await?;
        Ok(())
    }

    /// Completes the file and adds its row; `None` (nothing kept) when it has no line.
    async fn finish(
        self,
        store: &Store,
        customer_id: &str,
        name: &str,
    ) -> anyhow::Result<Option<String>> {
        if self.lines == 0 {
            self.upload.abort().await;
            return Ok(None);
        }
        self.upload.finish().await?;
        let row = FileRow {
            id: self.id.clone(),
            customer_id: customer_id.into(),
            filename: name.into(),
            purpose: "batch_output".into(),
            bytes: self.bytes,
            lines: self.lines,
            created_at: unix_now(),
            expires_at: None,
        };
        // The customer paid for these lines: their results are never refused by the quota.
        if store.insert_file(&row, i64::MAX).await?.is_err() {
            anyhow::bail!("the output file {} was refused", self.id);
        }
        Ok(Some(self.id))
    }
}

/// The error file line of a line that never ran.
fn not_run(batch_id: &str, o: &LineOutcome, code: &str, message: &str) -> String {
    let id = request_id(batch_id, &o.custom_id, 0);
    json!({
        "id": format!("batch_req_{}", id.replace('-', "")),
        "custom_id": o.custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
    .to_string()
}

/// Ends batch `id` if it is done and no other runner is ending it.
pub async fn end(store: &Store, files: &FileStorage, id: &str, lease: i64) -> anyhow::Result<()> {
    let now = unix_now();
    let Some(batch) = store.claim_batch_end(id, now, now + lease).await? else {
        return Ok(());
    };
    let (mut output, mut errors) = (Output::new(files), Output::new(files));
    let mut after = 0;
    loop {
        let page = store.batch_outcomes(id, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.line;
        for o in page {
            match (o.state, o.result.clone()) {
                (LineState::Completed, Some(r)) => output.push(r).await?,
                (LineState::Failed, Some(r)) => errors.push(r).await?,
                (LineState::Expired, _) => {
                    let message = "This request could not be executed before the completion \
                                   window expired.";
                    errors
                        .push(not_run(id, &o, "batch_expired", message))
                        .await?;
                }
                (LineState::Cancelled, _) => {
                    let message = "This request was not executed: the batch was cancelled.";
                    errors
                        .push(not_run(id, &o, "batch_cancelled", message))
                        .await?;
                }
                (state, _) => {
                    tracing::warn!(batch = %id, line = o.line, %state, "a line not ended at the batch's end");
                }
            }
        }
    }
    let output_id = output
        .finish(store, &batch.customer_id, &format!("{id}_output.jsonl"))
        .await?;
    let error_id = errors
        .finish(store, &batch.customer_id, &format!("{id}_error.jsonl"))
        .await?;
    let ended = store
        .end_batch(id, (output_id.as_deref(), error_id.as_deref()), unix_now())
        .await?;
    match ended {
        Some(status) => tracing::info!(batch = %id, %status, "batch ended"),
        None => tracing::warn!(batch = %id, "the batch was ended by another runner"),
    }
    Ok(())
}
