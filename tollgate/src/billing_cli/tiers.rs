//! The service-tier options that `customers create|update` and `keys create|update` share.

use clap::Args;
use tollgate_metering::accounts::parse_default_tier;
use tollgate_metering::kinds::ServiceTier;

#[derive(Debug, Args)]
pub struct TierArgs {
    /// The tier of requests that ask for `service_tier: "auto"` or none: `default`, `flex` or
    /// `priority` (`none` clears it: a key's then follows its customer's).
    #[arg(long)]
    default_service_tier: Option<String>,
    /// Whether requests may ask for `service_tier: "priority"` (`true` or `false`); a key
    /// narrows its customer's permission, never widens it.
    #[arg(long)]
    allow_priority: Option<bool>,
}

impl TierArgs {
    /// `--default-service-tier`: `None` unchanged, `Some(None)` cleared.
    pub fn default_tier(&self) -> anyhow::Result<Option<Option<ServiceTier>>> {
        match self.default_service_tier.as_deref() {
            None => Ok(None),
            Some("none" | "null") => Ok(Some(None)),
            Some(t) => parse_default_tier(t)
                .map(|t| Some(Some(t)))
                .map_err(|e| anyhow::anyhow!("--default-service-tier: {e}")),
        }
    }

    pub fn allow_priority(&self) -> Option<bool> {
        self.allow_priority
    }
}
