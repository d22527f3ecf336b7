//! The service-tier settings a customer and a key share: `default_service_tier` (the tier of
//! requests asking `auto`) and `allow_priority`, read from an admin API body.

use serde_json::{Map, Value};

use super::invalid_field;
use crate::error::ApiError;
use tollgate_metering::accounts::parse_default_tier;
use tollgate_metering::kinds::ServiceTier;

/// The fields, for `reject_unknown`.
pub(super) const TIER_FIELDS: &[&str] = &["default_service_tier", "allow_priority"];

/// `default_service_tier`: `default`, `flex`, `priority`, or `null` to clear it.
pub(super) fn default_tier_field(
    map: &Map<String, Value>,
) -> Result<Option<Option<ServiceTier>>, ApiError> {
    const FIELD: &str = "default_service_tier";
    match map.get(FIELD) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) => parse_default_tier(s)
            .map(|t| Some(Some(t)))
            .map_err(|e| invalid_field(FIELD, e)),
        Some(v) => Err(invalid_field(
            FIELD,
            format!("`{FIELD}` must be a string or null, got {v}"),
        )),
    }
}

/// `allow_priority`: a boolean.
pub(super) fn allow_priority_field(map: &Map<String, Value>) -> Result<Option<bool>, ApiError> {
    const FIELD: &str = "allow_priority";
    match map.get(FIELD) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid_field(
            FIELD,
            format!("`{FIELD}` must be true or false, got {v}"),
        )),
    }
}
