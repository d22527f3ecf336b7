//! The store's queries, by table: `customers`, `adapters` (customers' LoRA adapters), `keys`, `admin_tokens`, `usage` (the ledger),
//! `records` (the ledger read page by page), `sla` (the ledger's service levels),
//! `reservations` (reserved capacity), `files` (the Files API's files), `batches` (the Batch
//! API's batches and their lines) and `batch_runs` (claiming, running and ending those lines). The connection they run on, the error type and
//! the column helpers are `crate::db`'s, re-exported here so that callers name one place.
//!
//! Ledger order: records get an increasing `seq` that export cursors follow. On PostgreSQL
//! several gateways insert concurrently, so an insert transaction takes an advisory lock first:
//! `seq` values then become visible in order and a cursor never skips a record committed late.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::tags::{self, Tags};

mod adapters;
pub mod admin_tokens;
mod background;
mod batch_runs;
mod batches;
mod customers;
mod files;
mod keys;
mod prediction;
mod records;
mod reservations;
mod sla;
mod usage;
mod usage_row;

pub use crate::accounts::{ApiKey, Customer, CustomerAdapter};
pub(crate) use crate::db::{is_unique_violation, kind_column, optional_kind_column};
pub use crate::db::{normalize_url, now_micros, DbKind, Store, StoreError, StoreResult};
pub use background::{ClaimedRun, NewBackground, RunEnd};
pub use batch_runs::{ClaimedLine, LineOutcome, LineResult};
pub use batches::{BatchLine, BatchRow, BatchTimes, BatchUsage};
pub use customers::{valid_id, CustomerFields, MAX_SCHEDULING_WEIGHT};
pub use files::{FileQuery, FileRow, ListOrder, OverQuota};
pub use keys::{KeyFields, NewKey};
pub use records::{parse_cursor, RecordFilter, RecordPage};
pub use reservations::{peak_tpm, NewReservation, Reservation};
pub use sla::{SlaFilter, SlaRow, TTFT_BUCKETS_MS};
pub use usage::{
    record, GroupBy, PredictionTokens, UsageFilter, UsageRecord, UsageRow, RECORD_COLUMNS,
};

fn stored_tags(row: &AnyRow) -> StoreResult<Tags> {
    let text: Option<String> = row.try_get("tags")?;
    tags::from_json(text.as_deref()).map_err(StoreError::Invalid)
}
