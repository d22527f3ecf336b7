//! One row of the ledger's grouped aggregates ([`Store::aggregate`]): the group columns asked
//! for and the sums, as reports, invoices and the Usage API read them.

use sqlx::Row;

use super::usage::GroupBy;
#[cfg(doc)]
use super::Store;
use super::{kind_column, PredictionTokens, StoreResult};
use crate::kinds::ServiceTier;

/// One row of an aggregate; group columns not asked for are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRow {
    pub customer_id: Option<String>,
    pub model: Option<String>,
    pub key_id: Option<String>,
    /// With `GroupBy::Day`: the day's start; with buckets: the bucket's start (micros).
    pub bucket_start: Option<i64>,
    /// With `GroupBy::Tag`: the tag's value (`None`: records without the tag).
    pub tag_value: Option<String>,
    /// With `GroupBy::ServiceTier`: the tier.
    pub service_tier: Option<ServiceTier>,
    /// With `GroupBy::Adapter`: an adapter's model id's base model and adapter name.
    pub base_model: Option<String>,
    pub adapter: Option<String>,
    pub input_price_per_mtok: Option<String>,
    pub output_price_per_mtok: Option<String>,
    pub cached_input_price_per_mtok: Option<String>,
    pub requests: i64,
    pub input_tokens: i64,
    /// Of `input_tokens`, those served from a prefix cache.
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub cost_nano_usd: i64,
    /// Of `cost_nano_usd`, the cached prompt tokens' part.
    pub cached_cost_nano_usd: i64,
    /// The records' prediction tokens (with `GroupBy::Prices`, the rejected ones' price).
    pub prediction: PredictionTokens,
}

/// One row of [`Store::aggregate`]: the grouped columns that `group` (and time `buckets`)
/// asked for, and the sums (0 where SUM saw no rows).
pub(super) fn usage_row(
    row: &sqlx::any::AnyRow,
    group: &[GroupBy],
    buckets: bool,
) -> StoreResult<UsageRow> {
    let has = |g: GroupBy| group.contains(&g);
    let has_tag = group.iter().any(|g| matches!(g, GroupBy::Tag(_)));
    // A grouped column when `grouped`, else none.
    let column = |grouped: bool, name: &str| -> StoreResult<Option<String>> {
        Ok(if grouped { row.try_get(name)? } else { None })
    };
    let sum =
        |name: &str| -> StoreResult<i64> { Ok(row.try_get::<Option<i64>, _>(name)?.unwrap_or(0)) };
    let prices = has(GroupBy::Prices);
    Ok(UsageRow {
        customer_id: column(has(GroupBy::Customer), "customer_id")?,
        model: column(has(GroupBy::Model), "model")?,
        key_id: column(has(GroupBy::Key), "key_id")?,
        bucket_start: if has(GroupBy::Day) || buckets {
            row.try_get("bucket_start")?
        } else {
            None
        },
        tag_value: column(has_tag, "tag_value")?,
        service_tier: if has(GroupBy::ServiceTier) {
            Some(kind_column(row, "service_tier")?)
        } else {
            None
        },
        base_model: column(has(GroupBy::Adapter), "base_model")?,
        adapter: column(has(GroupBy::Adapter), "adapter")?,
        input_price_per_mtok: column(prices, "input_price_per_mtok")?,
        output_price_per_mtok: column(prices, "output_price_per_mtok")?,
        cached_input_price_per_mtok: column(prices, "cached_input_price_per_mtok")?,
        requests: row.try_get("requests")?,
        // SUM over no rows is NULL.
        input_tokens: sum("input_tokens")?,
        output_tokens: sum("output_tokens")?,
        cost_nano_usd: sum("cost_nano_usd")?,
        cached_input_tokens: sum("cached_input_tokens")?,
        cached_cost_nano_usd: sum("cached_cost_nano_usd")?,
        prediction: PredictionTokens::read(row, Some(prices))?,
    })
}
