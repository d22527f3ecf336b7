//! Time in the ledger: billing months (UTC) and the RFC 3339 form of stored microseconds. Its
//! own module so the store, limits, alerts and reports all use it without depending on each
//! other.

use chrono::{Datelike, SecondsFormat, TimeZone, Utc};

/// Microseconds → RFC 3339 in UTC with microseconds (`2026-11-23T10:26:37.123456Z`).
pub fn rfc3339(micros: i64) -> String {
    Utc.timestamp_micros(micros)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_else(|| micros.to_string())
}

/// Start of the UTC month containing `micros`, and of the next one.
pub fn month_bounds(micros: i64) -> (i64, i64) {
    let now = Utc
        .timestamp_micros(micros)
        .single()
        .unwrap_or_else(Utc::now);
    let start = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(now);
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    let next = Utc
        .with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .unwrap_or(now);
    (start.timestamp_micros(), next.timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_utc_calendar_months() {
        let t = Utc
            .with_ymd_and_hms(2026, 12, 31, 23, 59, 59)
            .unwrap()
            .timestamp_micros();
        let (s, n) = month_bounds(t);
        assert_eq!(
            s,
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0)
                .unwrap()
                .timestamp_micros()
        );
        assert_eq!(
            n,
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0)
                .unwrap()
                .timestamp_micros()
        );
    }
}
