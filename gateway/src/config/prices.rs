//! A model's `price` table from models.toml: the default unit prices, each tier's (or the
//! default rule for it), the tiers sold, and the reserved price, validated into types.

use std::str::FromStr;

use rust_decimal::Decimal;
use tollgate_metering::kinds::ServiceTier;
use tollgate_metering::money::{Price, TierPrices};

/// A `price` table as written (the ledger keeps a customer adapter's in this form too).
pub(super) use tollgate_metering::money::{PriceTable as RawPrice, TierPriceTable as RawTierPrice};

/// A model's `price` table: decimal strings, none negative; the cached input price is the
/// input price and the rejected prediction price the output price unless set; `flex` and `batch` cost half the default prices and `priority` the
/// default prices × `priority_multiplier` (1) unless set.
pub(super) fn validate_prices(p: RawPrice) -> Result<TierPrices, String> {
    let default = validate_price(
        "",
        [&p.input_per_mtok, &p.output_per_mtok],
        [&p.cached_input_per_mtok, &p.rejected_prediction_per_mtok],
    )?;
    let tier = |name: &str, raw: &Option<RawTierPrice>, otherwise: Price| match raw {
        Some(t) => validate_price(
            &format!("{name}."),
            [&t.input_per_mtok, &t.output_per_mtok],
            [&t.cached_input_per_mtok, &t.rejected_prediction_per_mtok],
        ),
        None => Ok(otherwise),
    };
    let half = default.scaled(Decimal::new(5, 1));
    let multiplier = match &p.priority_multiplier {
        Some(v) => price_decimal("priority_multiplier", v)?,
        None => Decimal::ONE,
    };
    Ok(TierPrices {
        priority: Some(tier("priority", &p.priority, default.scaled(multiplier))?),
        default: Some(default),
        flex: Some(tier("flex", &p.flex, half)?),
        batch: Some(tier("batch", &p.batch, half)?),
    })
}

/// `prices` with only `tiers` sold.
pub(super) fn only_tiers(prices: TierPrices, tiers: &[ServiceTier]) -> Result<TierPrices, String> {
    if tiers.is_empty() {
        return Err("service_tiers is empty: a model must be sold at one tier at least".into());
    }
    if tiers.contains(&ServiceTier::Reserved) {
        return Err(
            "service_tiers lists `reserved`: reserved capacity is sold by reservation \
             (capacity_tpm and price.reserved_per_ktpm_month), not per token"
                .into(),
        );
    }
    let keep = |t: ServiceTier| {
        if tiers.contains(&t) {
            prices.get(t)
        } else {
            None
        }
    };
    Ok(TierPrices {
        priority: keep(ServiceTier::Priority),
        default: keep(ServiceTier::Default),
        flex: keep(ServiceTier::Flex),
        batch: keep(ServiceTier::Batch),
    })
}

/// The key a message of [`validate_prices`] names (`price.flex.input_per_mtok`): each starts
/// with it.
pub(super) fn field_of(message: &str) -> String {
    message
        .split_once(' ')
        .map_or(message, |(field, _)| field)
        .to_string()
}

/// `price.{prefix}{key}` as a decimal, not negative.
pub(super) fn price_decimal(key: &str, v: &str) -> Result<Decimal, String> {
    let d = Decimal::from_str(v.trim())
        .map_err(|e| format!("price.{key} `{v}` is not a decimal number: {e}"))?;
    if d.is_sign_negative() {
        return Err(format!("price.{key} `{v}` is negative"));
    }
    Ok(d)
}

/// One tier's unit prices under `price.{prefix}`: input and output, then the cached input
/// and rejected prediction prices (the input and output prices when absent).
fn validate_price(
    prefix: &str,
    [input, output]: [&str; 2],
    [cached, rejected]: [&Option<String>; 2],
) -> Result<Price, String> {
    let input_per_mtok = price_decimal(&format!("{prefix}input_per_mtok"), input)?;
    let output_per_mtok = price_decimal(&format!("{prefix}output_per_mtok"), output)?;
    let or = |key: &str, v: &Option<String>, otherwise: Decimal| match v {
        Some(v) => price_decimal(&format!("{prefix}{key}"), v),
        None => Ok(otherwise),
    };
    Ok(Price {
        input_per_mtok,
        output_per_mtok,
        cached_input_per_mtok: or("cached_input_per_mtok", cached, input_per_mtok)?,
        rejected_prediction_per_mtok: or(
            "rejected_prediction_per_mtok",
            rejected,
            output_per_mtok,
        )?,
    })
}
