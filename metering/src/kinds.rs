//! The closed vocabularies of a usage record and a customer's plan: how a request ended, which
//! endpoint served it, where its token counts came from, and the period a budget covers.
//!
//! They are stored and exported as the strings their `as_str` names (unchanged from when they
//! were plain strings), parsed once where they enter (a request, a database row, the admin API)
//! and matched as types everywhere after, so a misspelt outcome is a compile error rather than
//! a request that is silently charged.

use serde::{Deserialize, Serialize};

/// An enum of the vocabulary, with the traits every one of them has and `as_str`, the string
/// it is stored and exported as.
macro_rules! kind {
    ($(#[$meta:meta])* pub enum $name:ident { $($body:tt)* }) => {
        #[derive(
            Debug,
            Clone,
            Copy,
            Default,
            PartialEq,
            Eq,
            PartialOrd,
            Ord,
            Hash,
            Serialize,
            Deserialize,
            strum::EnumString,
            strum::IntoStaticStr,
            strum::Display,
        )]
        $(#[$meta])*
        pub enum $name { $($body)* }

        impl $name {
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
    };
}

kind! {
    /// How a request ended: what decides whether it is charged.
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    pub enum Outcome {
        /// The answer reached its end (a finish reason); charged.
        #[default]
        Completed,
        /// The client went away before the end; charged for what the model produced.
        Cancelled,
        /// The server or a backend failed it; recorded, never charged.
        Failed,
        /// Another run of its `Idempotency-Key` was charged instead (this one lost its lease,
        /// or reached the ledger second); recorded with its tokens, never charged.
        Superseded,
    }
}

impl Outcome {
    /// Whether its tokens are charged: failures are on us, and a key is charged once.
    pub fn is_charged(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }
}

kind! {
    /// The public endpoint a request came in on, as its path.
    pub enum Endpoint {
        #[default]
        #[serde(rename = "/v1/chat/completions")]
        #[strum(serialize = "/v1/chat/completions")]
        ChatCompletions,
        #[serde(rename = "/v1/completions")]
        #[strum(serialize = "/v1/completions")]
        Completions,
        #[serde(rename = "/v1/responses")]
        #[strum(serialize = "/v1/responses")]
        Responses,
    }
}

kind! {
    /// Where a record's token counts came from, most trusted first (`max` of several is the
    /// least trusted).
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    pub enum UsageSource {
        /// The model's own tokenizer, in this process or a Tollgate worker.
        #[default]
        Engine,
        /// An upstream's `usage`, at least what the gateway observed.
        Upstream,
        /// The upstream's `usage` was missing or reported fewer output tokens than the gateway
        /// saw stream by: the gateway's own count.
        Observed,
    }
}

kind! {
    /// The period a customer's budget covers.
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    pub enum BudgetPeriod {
        /// UTC calendar months.
        #[default]
        Monthly,
    }
}

/// Whose monthly budget a spend counts against: a customer's, or one key's own. Stored (the
/// `customer_id` column of `customer_spend`, and the scope of a shared budget hold) as the
/// customer's id, or as `key:<id>` for a key; customer ids cannot hold `:`, so the two never
/// meet. Formatted and parsed only where it meets the database ([`BudgetScope::stored`],
/// [`BudgetScope::from_stored`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BudgetScope {
    Customer(String),
    Key(String),
}

impl BudgetScope {
    const KEY_PREFIX: &'static str = "key:";

    /// The form the database keeps.
    pub fn stored(&self) -> String {
        match self {
            Self::Customer(id) => id.clone(),
            Self::Key(id) => format!("{}{id}", Self::KEY_PREFIX),
        }
    }

    /// A scope as the database keeps it.
    pub fn from_stored(stored: &str) -> Self {
        match stored.strip_prefix(Self::KEY_PREFIX) {
            Some(key_id) => Self::Key(key_id.to_string()),
            None => Self::Customer(stored.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored and exported strings are the ones records had when these were strings:
    /// changing one would orphan every row written before.
    #[test]
    fn strings_are_the_stored_ones() {
        for (o, s) in [
            (Outcome::Completed, "completed"),
            (Outcome::Cancelled, "cancelled"),
            (Outcome::Failed, "failed"),
            (Outcome::Superseded, "superseded"),
        ] {
            assert_eq!(o.as_str(), s);
            assert_eq!(s.parse::<Outcome>().ok(), Some(o));
            assert_eq!(serde_json::to_value(o).ok(), Some(serde_json::json!(s)));
        }
        for (e, s) in [
            (Endpoint::ChatCompletions, "/v1/chat/completions"),
            (Endpoint::Completions, "/v1/completions"),
            (Endpoint::Responses, "/v1/responses"),
        ] {
            assert_eq!(e.as_str(), s);
            assert_eq!(s.parse::<Endpoint>().ok(), Some(e));
            assert_eq!(serde_json::to_value(e).ok(), Some(serde_json::json!(s)));
        }
        for (u, s) in [
            (UsageSource::Engine, "engine"),
            (UsageSource::Upstream, "upstream"),
            (UsageSource::Observed, "observed"),
        ] {
            assert_eq!(u.as_str(), s);
            assert_eq!(s.parse::<UsageSource>().ok(), Some(u));
        }
        assert_eq!(BudgetPeriod::Monthly.as_str(), "monthly");
        assert!("weekly".parse::<BudgetPeriod>().is_err());
        assert!("Failed".parse::<Outcome>().is_err());
        assert!(Outcome::Cancelled.is_charged() && !Outcome::Failed.is_charged());
        assert!(!Outcome::Superseded.is_charged());
        assert!(UsageSource::Observed > UsageSource::Engine);
    }

    /// A key's scope is stored as `key:<id>`, a customer's as its id: the rows of
    /// `customer_spend` written before the enum read back as they were written.
    #[test]
    fn budget_scopes_are_stored_as_before() {
        for (scope, s) in [
            (BudgetScope::Customer("acme".into()), "acme"),
            (BudgetScope::Key("key_01".into()), "key:key_01"),
        ] {
            assert_eq!(scope.stored(), s);
            assert_eq!(BudgetScope::from_stored(s), scope);
        }
    }
}
