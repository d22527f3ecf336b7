//! Exact money: prices are decimals (USD per million tokens), amounts are integer nano-USD.
//!
//! A request's cost is computed once, from its token counts and the unit prices in force, and
//! rounded once to the nano-dollar (half away from zero). Every total is a sum of those integers,
//! so an invoice equals the sum of its records to the last unit.

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::kinds::ServiceTier;

/// USD per million tokens, exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Price {
    pub input_per_mtok: Decimal,
    pub output_per_mtok: Decimal,
    /// Prompt tokens served from a prefix cache (`input_per_mtok` unless configured).
    pub cached_input_per_mtok: Decimal,
    /// Tokens of a request's `prediction` verified and thrown away (OpenAI's
    /// `rejected_prediction_tokens`; `output_per_mtok` unless configured, OpenAI's rule).
    pub rejected_prediction_per_mtok: Decimal,
}

impl Price {
    /// Every unit price multiplied by `factor`, exact (trailing zeros dropped; × 1 is the
    /// price unchanged, as configured).
    pub fn scaled(self, factor: Decimal) -> Price {
        if factor == Decimal::ONE {
            return self;
        }
        Price {
            input_per_mtok: (self.input_per_mtok * factor).normalize(),
            output_per_mtok: (self.output_per_mtok * factor).normalize(),
            cached_input_per_mtok: (self.cached_input_per_mtok * factor).normalize(),
            rejected_prediction_per_mtok: (self.rejected_prediction_per_mtok * factor).normalize(),
        }
    }
}

/// A price table as written, before it is validated into [`TierPrices`]: the keys of a
/// model's `price` in models.toml (decimal strings, USD per million tokens), which a
/// customer's adapter takes too (`POST /admin/v1/customers/{id}/adapters`). The gateway's
/// configuration validates it; the ledger keeps a customer adapter's as given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    pub input_per_mtok: String,
    pub output_per_mtok: String,
    /// Prompt tokens served from a prefix cache; the input price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<String>,
    /// Tokens of a `prediction` computed and thrown away; the output price when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_prediction_per_mtok: Option<String>,
    /// `flex`'s prices; half the default ones when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flex: Option<TierPriceTable>,
    /// `batch`'s prices; half the default ones when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<TierPriceTable>,
    /// `priority`'s prices; the default ones × `priority_multiplier` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<TierPriceTable>,
    /// 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_multiplier: Option<String>,
    /// USD per 1,000 reserved tokens per minute per month; absent: not sold reserved (a
    /// model's only: an adapter shares its base model's reservations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_per_ktpm_month: Option<String>,
}

/// One tier's unit prices in a [`PriceTable`] (the same keys as the default ones).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierPriceTable {
    pub input_per_mtok: String,
    pub output_per_mtok: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_prediction_per_mtok: Option<String>,
}

/// A model's prices per class of service: `None` where the model is not sold at that tier (a
/// request for it is refused, never billed at another tier's price).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierPrices {
    pub priority: Option<Price>,
    pub default: Option<Price>,
    pub flex: Option<Price>,
    pub batch: Option<Price>,
}

impl TierPrices {
    /// Every tier at `price` (a free model: every tier at zero).
    pub fn uniform(price: Price) -> TierPrices {
        TierPrices {
            priority: Some(price),
            default: Some(price),
            flex: Some(price),
            batch: Some(price),
        }
    }

    /// The unit prices of `tier`, if the model is sold at it.
    pub fn get(&self, tier: ServiceTier) -> Option<Price> {
        match tier {
            ServiceTier::Priority => self.priority,
            ServiceTier::Default => self.default,
            ServiceTier::Flex => self.flex,
            ServiceTier::Batch => self.batch,
            // Paid for by the month's reservation line, not per token.
            ServiceTier::Reserved => Some(Price::default()),
        }
    }

    /// The tiers the model is sold at per token, highest first (`reserved` is sold by the
    /// month, not here).
    pub fn offered(&self) -> impl Iterator<Item = (ServiceTier, Price)> + '_ {
        [
            ServiceTier::Priority,
            ServiceTier::Default,
            ServiceTier::Flex,
            ServiceTier::Batch,
        ]
        .into_iter()
        .filter_map(|t| self.get(t).map(|p| (t, p)))
    }
}

/// Nano-USD per USD.
const NANOS_PER_USD: i64 = 1_000_000_000;

/// Cost in nano-USD of `input` fresh prompt tokens and `output` tokens at `price` (USD per
/// million tokens).
pub fn cost_nano_usd(price: &Price, input: u64, output: u64) -> i64 {
    cost_with_cached_nano_usd(price, input, 0, output)
}

/// Cost in nano-USD of a request whose `input` prompt tokens include `cached` served from a
/// prefix cache: fresh × input price + cached × cached price + output × output price, rounded
/// once. `cached` above `input` counts as `input` (a prompt cannot be more than cached).
pub fn cost_with_cached_nano_usd(price: &Price, input: u64, cached: u64, output: u64) -> i64 {
    cost_with_prediction_nano_usd(price, (input, cached, output), 0)
}

/// Cost in nano-USD of a request as [`cost_with_cached_nano_usd`], with `rejected` tokens of
/// its prediction besides (verified, thrown away, not among `output`) at the rejected
/// prediction price: rounded once, the whole.
pub fn cost_with_prediction_nano_usd(
    price: &Price,
    (input, cached, output): (u64, u64, u64),
    rejected: u64,
) -> i64 {
    let cached = cached.min(input);
    round_nanos(
        (Decimal::from(input - cached) * price.input_per_mtok
            + Decimal::from(cached) * price.cached_input_per_mtok
            + Decimal::from(output) * price.output_per_mtok
            + Decimal::from(rejected) * price.rejected_prediction_per_mtok)
            * NANOS_PER_MUSD,
    )
}

/// The part of a request's cost that is its rejected prediction tokens, rounded alone (an
/// invoice's `rejected_prediction` line is the sum of these).
pub fn rejected_prediction_part_nano_usd(price: &Price, rejected: u64) -> i64 {
    round_nanos(Decimal::from(rejected) * price.rejected_prediction_per_mtok * NANOS_PER_MUSD)
}

/// The part of a request's cost that is its cached prompt tokens, rounded alone (an invoice's
/// cached-input line is the sum of these; the rest of the record's cost is its other line).
pub fn cached_part_nano_usd(price: &Price, input: u64, cached: u64) -> i64 {
    round_nanos(Decimal::from(cached.min(input)) * price.cached_input_per_mtok * NANOS_PER_MUSD)
}

/// The most a request can cost before its cached tokens are known: every prompt token at the
/// higher of the input and cached prices.
pub fn max_cost_nano_usd(price: &Price, input: u64, output: u64) -> i64 {
    cost_nano_usd(price, input, output).max(cost_with_cached_nano_usd(price, input, input, output))
}

/// What a reservation of `tpm` tokens per minute costs, at `price_per_ktpm_month` USD per
/// 1,000 TPM per month, for `active` of a month `month` long (both in microseconds): price ×
/// TPM / 1000 × active / month, in nano-USD rounded once, half away from zero, as every
/// record is. Exact: computed as one fraction of integers (`active / month` reduced first).
pub fn reservation_nano_usd(
    price_per_ktpm_month: Decimal,
    tpm: i64,
    active: i64,
    month: i64,
) -> i64 {
    if active <= 0 || month <= 0 || tpm <= 0 || price_per_ktpm_month.is_sign_negative() {
        return 0;
    }
    let (active, month) = (i128::from(active.min(month)), i128::from(month));
    let g = gcd(active, month);
    let (active, month) = (active / g, month / g);
    // price = mantissa / 10^scale; nano-USD per USD / 1000 TPM per kTPM = 10^6.
    let numerator = price_per_ktpm_month
        .mantissa()
        .checked_mul(i128::from(tpm))
        .and_then(|n| n.checked_mul(active))
        .and_then(|n| n.checked_mul(1_000_000));
    let denominator = 10i128
        .checked_pow(price_per_ktpm_month.scale())
        .and_then(|d| d.checked_mul(month));
    let (Some(n), Some(d)) = (numerator, denominator) else {
        return i64::MAX;
    };
    let (q, r) = (n / d, n % d);
    let rounded = if 2 * r >= d { q + 1 } else { q };
    i64::try_from(rounded).unwrap_or(i64::MAX)
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// USD per million tokens × 1000 = nano-USD per token.
const NANOS_PER_MUSD: Decimal = Decimal::from_parts(1000, 0, 0, false, 0);

fn round_nanos(exact: Decimal) -> i64 {
    exact
        .round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero)
        .to_i64()
        .unwrap_or(i64::MAX)
}

/// `1250` → `"0.000001250"`: USD with nine decimals, as the admin API shows money.
pub fn format_usd(nano: i64) -> String {
    let sign = if nano < 0 { "-" } else { "" };
    let abs = nano.unsigned_abs();
    let per = NANOS_PER_USD.unsigned_abs();
    format!("{sign}{}.{:09}", abs / per, abs % per)
}

/// A USD amount (decimal string or number) → nano-USD. Errors name the problem.
pub fn parse_usd(text: &str) -> Result<i64, String> {
    let d: Decimal = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a decimal amount of USD"))?;
    if d.is_sign_negative() {
        return Err(format!("`{text}` is negative"));
    }
    if d.scale() > 9 {
        return Err(format!("`{text}` has more than 9 decimal places"));
    }
    d.checked_mul(Decimal::from(NANOS_PER_USD))
        .and_then(|n| n.to_i64())
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// nano-USD as an `f64` of USD, only for response shapes that require a JSON number (the
/// OpenAI costs API); totals are always computed in integers first.
pub fn usd_f64(nano: i64) -> f64 {
    Decimal::new(nano, 9).to_f64().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(i: &str, o: &str) -> Price {
        Price {
            input_per_mtok: i.parse().unwrap(),
            output_per_mtok: o.parse().unwrap(),
            cached_input_per_mtok: i.parse().unwrap(),
            rejected_prediction_per_mtok: o.parse().unwrap(),
        }
    }

    /// Rejected prediction tokens cost their own price beside the rest, the whole rounded
    /// once; their part alone is rounded alone.
    #[test]
    fn rejected_prediction_tokens_cost_their_price_beside_the_output() {
        let mut p = price("0.05", "0.10");
        // 10 prompt tokens (4 cached at 0.0125), 3 output, 5 rejected at the output price:
        // 6×50 + 4×12.5 + 3×100 + 5×100 = 1150.
        p.cached_input_per_mtok = "0.0125".parse().unwrap();
        assert_eq!(cost_with_prediction_nano_usd(&p, (10, 4, 3), 5), 1150);
        assert_eq!(rejected_prediction_part_nano_usd(&p, 5), 500);
        // None rejected: the cost without a prediction.
        assert_eq!(
            cost_with_prediction_nano_usd(&p, (10, 4, 3), 0),
            cost_with_cached_nano_usd(&p, 10, 4, 3)
        );
        // A price of their own, rounded once with the rest: 3 × 0.0005 = 1.5 → 2 alone, and
        // 1×100 + 3×0.5 = 101.5 → 102 whole.
        p.rejected_prediction_per_mtok = "0.0005".parse().unwrap();
        assert_eq!(rejected_prediction_part_nano_usd(&p, 3), 2);
        assert_eq!(cost_with_prediction_nano_usd(&p, (0, 0, 1), 3), 102);
        // Scaled with the other prices (a tier's half).
        let half = p.scaled("0.5".parse().unwrap());
        assert_eq!(
            half.rejected_prediction_per_mtok,
            "0.00025".parse().unwrap()
        );
    }

    #[test]
    fn cached_prompt_tokens_cost_the_cached_price() {
        let mut p = price("0.05", "0.10");
        p.cached_input_per_mtok = "0.0125".parse().unwrap();
        // 10 prompt tokens of which 4 cached, 3 output: 6×50 + 4×12.5 + 3×100 = 650.
        assert_eq!(cost_with_cached_nano_usd(&p, 10, 4, 3), 650);
        assert_eq!(cached_part_nano_usd(&p, 10, 4), 50);
        // Nothing cached: the plain cost.
        assert_eq!(
            cost_with_cached_nano_usd(&p, 10, 0, 3),
            cost_nano_usd(&p, 10, 3)
        );
        // Cached beyond the prompt counts as the whole prompt.
        assert_eq!(cost_with_cached_nano_usd(&p, 2, 9, 0), 25);
        // Rounded once per request: 1 cached token = 12.5 → 13, but 2 = 25.
        assert_eq!(cost_with_cached_nano_usd(&p, 1, 1, 0), 13);
        assert_eq!(cost_with_cached_nano_usd(&p, 2, 2, 0), 25);
        // The reservation covers either price.
        assert_eq!(max_cost_nano_usd(&p, 10, 3), cost_nano_usd(&p, 10, 3));
        p.cached_input_per_mtok = "0.5".parse().unwrap();
        assert_eq!(max_cost_nano_usd(&p, 10, 3), 10 * 500 + 300);
    }

    /// A reservation's month is prorated exactly and rounded once.
    #[test]
    fn reservations_prorate_exactly() {
        let day = 86_400_000_000i64;
        let price: Decimal = "12.50".parse().unwrap();
        // A whole 30-day month of 10,000 TPM at $12.50 per 1,000 TPM: $125.
        assert_eq!(
            reservation_nano_usd(price, 10_000, 30 * day, 30 * day),
            125_000_000_000
        );
        // 10 of 30 days: exactly a third ($41.666666666 and 2/3 nano → rounded up).
        assert_eq!(
            reservation_nano_usd(price, 10_000, 10 * day, 30 * day),
            41_666_666_667
        );
        // 1 of 31 days of 1 TPM at $0.0000155: exactly half a nano-USD → 1 (away from zero),
        // and at $0.000031 exactly one.
        let half: Decimal = "0.0000155".parse().unwrap();
        assert_eq!(reservation_nano_usd(half, 1, day, 31 * day), 1);
        let one: Decimal = "0.000031".parse().unwrap();
        assert_eq!(reservation_nano_usd(one, 1, day, 31 * day), 1);
        assert_eq!(reservation_nano_usd(one, 1, day / 2, 31 * day), 1);
        assert_eq!(reservation_nano_usd(one, 1, day / 3, 31 * day), 0);
        assert_eq!(reservation_nano_usd(price, 10_000, 0, 30 * day), 0);
        // Active beyond the month counts as the month.
        assert_eq!(
            reservation_nano_usd(price, 10_000, 40 * day, 30 * day),
            125_000_000_000
        );
    }

    #[test]
    fn costs_are_exact_nanos() {
        let p = price("0.05", "0.10");
        // 1 input token at $0.05/M = 50 nano-USD; 1 output token = 100.
        assert_eq!(cost_nano_usd(&p, 1, 0), 50);
        assert_eq!(cost_nano_usd(&p, 10, 7), 500 + 700);
        assert_eq!(cost_nano_usd(&p, 1_000_000, 1_000_000), 150_000_000);
        // Sub-nano unit prices round once per request, half away from zero.
        let tiny = price("0.0005", "0.0015");
        assert_eq!(cost_nano_usd(&tiny, 1, 0), 1); // 0.5 → 1
        assert_eq!(cost_nano_usd(&tiny, 3, 1), 3); // 1.5 + 1.5 = 3
        assert_eq!(cost_nano_usd(&price("0", "0"), 5, 5), 0);
    }

    #[test]
    fn formats_and_parses_usd() {
        assert_eq!(format_usd(1250), "0.000001250");
        assert_eq!(format_usd(12_000_000_001), "12.000000001");
        assert_eq!(format_usd(0), "0.000000000");
        assert_eq!(parse_usd("12.5").unwrap(), 12_500_000_000);
        assert_eq!(parse_usd("0.000000001").unwrap(), 1);
        assert!(parse_usd("-1").is_err());
        assert!(parse_usd("0.0000000001").is_err());
        assert!(parse_usd("ten").is_err());
        assert_eq!(parse_usd(&format_usd(987_654_321)).unwrap(), 987_654_321);
    }
}
