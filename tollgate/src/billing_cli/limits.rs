//! The rate and concurrency limits that `customers create|update` and `keys create|update`
//! share, as the same options: a customer's hold across its keys, a key's for itself.

use anyhow::bail;
use clap::Args;

/// A new customer's or key's limits (none when absent).
#[derive(Debug, Args)]
pub struct NewLimits {
    /// Requests per minute (a customer's: across its keys).
    #[arg(long)]
    rpm: Option<i64>,
    /// Tokens per minute (a customer's: across its keys).
    #[arg(long)]
    tpm: Option<i64>,
    /// Requests in flight at once (a customer's: across its keys).
    #[arg(long)]
    max_concurrent_requests: Option<i64>,
}

/// A customer's or key's limits to change: a number, or `none` to clear one; absent ones stay.
#[derive(Debug, Args)]
pub struct LimitChanges {
    /// Requests per minute, or `none` (a customer's: across its keys).
    #[arg(long)]
    rpm: Option<String>,
    /// Tokens per minute, or `none` (a customer's: across its keys).
    #[arg(long)]
    tpm: Option<String>,
    /// Requests in flight at once, or `none` (a customer's: across its keys).
    #[arg(long)]
    max_concurrent_requests: Option<String>,
}

/// Requests per minute, tokens per minute and requests in flight, in that order.
pub struct Limits<T> {
    pub rpm: T,
    pub tpm: T,
    pub max_concurrent_requests: T,
}

impl<T> Limits<T> {
    /// Each limit through `f` (`map(Some)`: a new customer's limits as changes that set them).
    pub fn map<U>(self, f: impl Fn(T) -> U) -> Limits<U> {
        Limits {
            rpm: f(self.rpm),
            tpm: f(self.tpm),
            max_concurrent_requests: f(self.max_concurrent_requests),
        }
    }
}

impl NewLimits {
    /// The limits, each checked positive.
    pub fn checked(self) -> anyhow::Result<Limits<Option<i64>>> {
        for (value, name) in [
            (self.rpm, "rpm"),
            (self.tpm, "tpm"),
            (self.max_concurrent_requests, "max-concurrent-requests"),
        ] {
            if value.is_some_and(|v| v <= 0) {
                bail!("--{name} must be positive");
            }
        }
        Ok(Limits {
            rpm: self.rpm,
            tpm: self.tpm,
            max_concurrent_requests: self.max_concurrent_requests,
        })
    }
}

impl LimitChanges {
    /// Each limit's change: `None` unchanged, `Some(None)` cleared.
    pub fn parsed(&self) -> anyhow::Result<Limits<Option<Option<i64>>>> {
        Ok(Limits {
            rpm: limit_arg(self.rpm.as_deref(), "rpm")?,
            tpm: limit_arg(self.tpm.as_deref(), "tpm")?,
            max_concurrent_requests: limit_arg(
                self.max_concurrent_requests.as_deref(),
                "max-concurrent-requests",
            )?,
        })
    }
}

fn limit_arg(text: Option<&str>, name: &str) -> anyhow::Result<Option<Option<i64>>> {
    match text {
        None => Ok(None),
        Some("none" | "null") => Ok(Some(None)),
        Some(t) => match t.parse::<i64>() {
            Ok(n) if n > 0 => Ok(Some(Some(n))),
            _ => bail!("--{name} must be a positive integer or `none`, got `{t}`"),
        },
    }
}
