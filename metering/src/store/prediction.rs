//! A usage record's Predicted Outputs (OpenAI's `prediction` on chat completions): the part
//! of the record that holds its tokens and their charge, and how its columns read back, from
//! one record's row or from an aggregate's sums. The columns are written, selected and summed
//! with the rest of the record's in `usage.rs`.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{optional_kind_column, StoreResult};

/// A record's Predicted Outputs: `accepted` tokens of the prediction are a part of
/// `output_tokens` (charged as output); `rejected` ones were computed and thrown away, are not
/// among them, and are charged beside them at `price_per_mtok`, their part of the cost being
/// `cost_nano_usd` (rounded alone, like the cached part). On an aggregate row: the sums, and
/// the price when grouped by prices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PredictionTokens {
    pub accepted: i64,
    pub rejected: i64,
    /// `None` on records older than predictions (they have none).
    pub price_per_mtok: Option<Decimal>,
    pub cost_nano_usd: i64,
}

impl PredictionTokens {
    pub(super) fn is_none(&self) -> bool {
        *self == Self::default()
    }

    /// From a record's row (`grouped_by_prices: None`), or an aggregate's sums (0 where SUM saw
    /// no rows), with the price only when the aggregate is grouped by prices.
    pub(super) fn read(row: &AnyRow, grouped_by_prices: Option<bool>) -> StoreResult<Self> {
        let count = |name: &str| -> StoreResult<i64> {
            Ok(row.try_get::<Option<i64>, _>(name)?.unwrap_or(0))
        };
        let price = grouped_by_prices.unwrap_or(true);
        Ok(Self {
            accepted: count("accepted_prediction_tokens")?,
            rejected: count("rejected_prediction_tokens")?,
            price_per_mtok: if price {
                optional_kind_column(row, "rejected_prediction_price_per_mtok")?
            } else {
                None
            },
            cost_nano_usd: count("rejected_prediction_cost_nano_usd")?,
        })
    }
}
