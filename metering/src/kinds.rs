//! The closed vocabularies of a usage record and a customer's plan: how a request ended, which
//! endpoint served it, where its token counts came from, and the period a budget covers; and of
//! what else is read back from the database: why a sequence stopped, where a budget alert or an
//! idempotency key stands, and how a passed-through response ended.
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
    /// The class of service a request was served (and is billed) at, as OpenAI's
    /// `service_tier` names it. Highest first: `priority` > `default` > `flex` > `batch`.
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    #[derive(utoipa::ToSchema)]
    pub enum ServiceTier {
        /// Latency-sensitive work, ahead of every other class; sold at a premium.
        Priority,
        /// The class a request gets unless it or its key asks for another.
        #[default]
        Default,
        /// Work that can wait for capacity the classes above leave; sold cheaper.
        Flex,
        /// The Batch API's lines and background work: the fleet's surplus.
        Batch,
        /// Served within the customer's reservation on the model (engine class `priority`):
        /// billed per month for the reservation, never per token (its records cost zero).
        Reserved,
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

// ---- read back from the ledger and its neighbours (finish reasons, alert and idempotency
// states, the end of a passed-through response) ----------------------------------------------

kind! {
    /// Why a sequence stopped.
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    #[derive(utoipa::ToSchema)]
    pub enum FinishReason {
        /// End-of-sequence token or a stop string.
        #[default]
        Stop,
        /// `max_tokens` or the end of the context.
        Length,
        /// The model chose to call functions.
        ToolCalls,
        /// The client went away (never sent to a client; used for metering).
        Cancelled,
    }
}

kind! {
    /// Where a budget alert of the outbox stands.
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    pub enum AlertStatus {
        /// Waiting for its next delivery attempt.
        #[default]
        Pending,
        /// The customer's webhook accepted it.
        Delivered,
        /// Every attempt failed; no more are made.
        Failed,
        /// The customer had no webhook: kept for the record, never sent.
        NoWebhook,
    }
}

kind! {
    /// Where an `Idempotency-Key`'s first request stands.
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    pub enum IdempotencyState {
        /// Running under a lease its gateway renews.
        #[default]
        Running,
        /// Finished: its response is kept to replay.
        Done,
    }
}

kind! {
    /// How a response passed through from an upstream's own Responses API ended: its last
    /// event is `response.` and this.
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    pub enum ResponseEnd {
        /// Ended normally: charged.
        #[default]
        Completed,
        /// Stopped early (`max_output_tokens`): charged, finish reason `length`.
        Incomplete,
        /// The upstream failed it: recorded, never charged.
        Failed,
    }
}

impl ResponseEnd {
    /// The end an event of type `kind` is, if it is one of the last events.
    pub fn of_event(kind: &str) -> Option<Self> {
        kind.strip_prefix("response.")?.parse().ok()
    }

    /// How the request ended, for its record.
    pub fn outcome(self) -> Outcome {
        match self {
            Self::Completed | Self::Incomplete => Outcome::Completed,
            Self::Failed => Outcome::Failed,
        }
    }

    /// The finish reason its record carries.
    pub fn finish_reason(self) -> FinishReason {
        match self {
            Self::Incomplete => FinishReason::Length,
            Self::Completed | Self::Failed => FinishReason::Stop,
        }
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

kind! {
    /// Where a batch of the Batch API is in its lifecycle (OpenAI's statuses).
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    pub enum BatchStatus {
        /// Its input file's lines are being checked.
        #[default]
        Validating,
        /// The input file was refused: `errors` names the lines.
        Failed,
        /// Its lines are queued or running.
        InProgress,
        /// Every line is done; the output and error files are being written.
        Finalizing,
        /// Done, with its output and error files.
        Completed,
        /// Not done within its completion window.
        Expired,
        /// Cancelled while lines were running: they finish, the rest never start.
        Cancelling,
        /// Cancelled, and no line runs any more.
        Cancelled,
    }
}

kind! {
    /// Where one line of a batch is: `queued` until a runner claims it, `running` under the
    /// claim's lease, then one of the ends.
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    pub enum LineState {
        #[default]
        Queued,
        Running,
        /// It ran and its endpoint answered 2xx: in the output file.
        Completed,
        /// It ran and was refused or failed: in the error file.
        Failed,
        /// Not run within the batch's window: in the error file, unbilled.
        Expired,
        /// Not run: its batch was cancelled first.
        Cancelled,
    }
}

kind! {
    /// Where a background response is (OpenAI's `status`): `queued` until a runner claims it,
    /// `in_progress` under the claim's lease, then one of the ends.
    #[serde(rename_all = "snake_case")]
    #[strum(serialize_all = "snake_case")]
    pub enum RunStatus {
        #[default]
        Queued,
        InProgress,
        Completed,
        /// `max_output_tokens` (or the context) ran out.
        Incomplete,
        Failed,
        Cancelled,
    }
}

impl RunStatus {
    /// Whether it has ended (nothing more will happen to it).
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::InProgress)
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
        for (t, s) in [
            (ServiceTier::Priority, "priority"),
            (ServiceTier::Default, "default"),
            (ServiceTier::Flex, "flex"),
            (ServiceTier::Batch, "batch"),
            (ServiceTier::Reserved, "reserved"),
        ] {
            assert_eq!(t.as_str(), s);
            assert_eq!(s.parse::<ServiceTier>().ok(), Some(t));
            assert_eq!(serde_json::to_value(t).ok(), Some(serde_json::json!(s)));
        }
        for (u, s) in [
            (UsageSource::Engine, "engine"),
            (UsageSource::Upstream, "upstream"),
            (UsageSource::Observed, "observed"),
        ] {
            assert_eq!(u.as_str(), s);
            assert_eq!(s.parse::<UsageSource>().ok(), Some(u));
        }
        for (f, s) in [
            (FinishReason::Stop, "stop"),
            (FinishReason::Length, "length"),
            (FinishReason::ToolCalls, "tool_calls"),
            (FinishReason::Cancelled, "cancelled"),
        ] {
            assert_eq!(f.as_str(), s);
            assert_eq!(s.parse::<FinishReason>().ok(), Some(f));
            assert_eq!(serde_json::to_value(f).ok(), Some(serde_json::json!(s)));
        }
        for (a, s) in [
            (AlertStatus::Pending, "pending"),
            (AlertStatus::Delivered, "delivered"),
            (AlertStatus::Failed, "failed"),
            (AlertStatus::NoWebhook, "no_webhook"),
        ] {
            assert_eq!(a.as_str(), s);
            assert_eq!(s.parse::<AlertStatus>().ok(), Some(a));
            assert_eq!(serde_json::to_value(a).ok(), Some(serde_json::json!(s)));
        }
        for (i, s) in [
            (IdempotencyState::Running, "running"),
            (IdempotencyState::Done, "done"),
        ] {
            assert_eq!(i.as_str(), s);
            assert_eq!(s.parse::<IdempotencyState>().ok(), Some(i));
        }
        for (kind, end) in [
            ("response.completed", Some(ResponseEnd::Completed)),
            ("response.incomplete", Some(ResponseEnd::Incomplete)),
            ("response.failed", Some(ResponseEnd::Failed)),
            ("response.created", None),
            ("response.output_text.delta", None),
            ("completed", None),
        ] {
            assert_eq!(ResponseEnd::of_event(kind), end, "{kind}");
        }
        assert_eq!(ResponseEnd::Failed.outcome(), Outcome::Failed);
        assert_eq!(ResponseEnd::Incomplete.outcome(), Outcome::Completed);
        assert_eq!(
            ResponseEnd::Incomplete.finish_reason(),
            FinishReason::Length
        );
        assert_eq!(ResponseEnd::Completed.finish_reason(), FinishReason::Stop);
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

    /// The batch statuses are OpenAI's strings, stored as such.
    #[test]
    fn line_states_are_the_stored_ones() {
        for (l, s) in [
            (LineState::Queued, "queued"),
            (LineState::Running, "running"),
            (LineState::Completed, "completed"),
            (LineState::Failed, "failed"),
            (LineState::Expired, "expired"),
            (LineState::Cancelled, "cancelled"),
        ] {
            assert_eq!(l.as_str(), s);
            assert_eq!(s.parse::<LineState>().ok(), Some(l));
        }
        for (r, s) in [
            (RunStatus::Queued, "queued"),
            (RunStatus::InProgress, "in_progress"),
            (RunStatus::Completed, "completed"),
            (RunStatus::Incomplete, "incomplete"),
            (RunStatus::Failed, "failed"),
            (RunStatus::Cancelled, "cancelled"),
        ] {
            assert_eq!(r.as_str(), s);
            assert_eq!(s.parse::<RunStatus>().ok(), Some(r));
        }
    }

    #[test]
    fn batch_statuses_are_openais() {
        for (b, s) in [
            (BatchStatus::Validating, "validating"),
            (BatchStatus::Failed, "failed"),
            (BatchStatus::InProgress, "in_progress"),
            (BatchStatus::Finalizing, "finalizing"),
            (BatchStatus::Completed, "completed"),
            (BatchStatus::Expired, "expired"),
            (BatchStatus::Cancelling, "cancelling"),
            (BatchStatus::Cancelled, "cancelled"),
        ] {
            assert_eq!(b.as_str(), s);
            assert_eq!(s.parse::<BatchStatus>().ok(), Some(b));
            assert_eq!(serde_json::to_value(b).ok(), Some(serde_json::json!(s)));
        }
    }
}
