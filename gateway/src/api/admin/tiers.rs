//! The service-tier settings a customer and a key share: `default_service_tier` (the tier of
//! requests asking `auto`) and `allow_priority`, read from an admin API body.

use serde::Deserialize;
use utoipa::ToSchema;

use super::invalid_field;
use crate::error::ApiError;
use tollgate_metering::kinds::ServiceTier;

/// The fields, for `reject_unknown`.
pub(super) const TIER_FIELDS: &[&str] = &["default_service_tier", "allow_priority"];

/// A customer's or key's default service tier (`batch` is the Batch API's own).
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DefaultServiceTier {
    Default,
    Flex,
    Priority,
}

impl From<DefaultServiceTier> for ServiceTier {
    fn from(t: DefaultServiceTier) -> Self {
        match t {
            DefaultServiceTier::Default => Self::Default,
            DefaultServiceTier::Flex => Self::Flex,
            DefaultServiceTier::Priority => Self::Priority,
        }
    }
}

/// `default_service_tier` of a typed body: `None` unchanged, `Some(None)` cleared.
pub(super) fn default_tier(
    value: Option<Option<DefaultServiceTier>>,
) -> Option<Option<ServiceTier>> {
    value.map(|t| t.map(ServiceTier::from))
}

/// `allow_priority` of a typed body: a boolean, never `null`.
pub(super) fn allow_priority(value: Option<Option<bool>>) -> Result<Option<bool>, ApiError> {
    match value {
        Some(None) => Err(invalid_field(
            "allow_priority",
            "`allow_priority` must be true or false, got null".into(),
        )),
        v => Ok(v.flatten()),
    }
}
