//! Who an admin caller is ([`AdminIdentity`]: its credential and scopes), apart from how it
//! is found out (`mod.rs`), so that what holds identities (the console's sessions) needs
//! nothing else of the admin API.

pub use tollgate_metering::store::admin_tokens::Scope;

/// Who made an admin request: in the request's extensions for the handlers (and the audit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminIdentity {
    /// The token's id, or `bootstrap` for `TOLLGATE_ADMIN_TOKEN`.
    pub token_id: String,
    pub scopes: Vec<Scope>,
}

/// The id the bootstrap token is known by.
pub const BOOTSTRAP_ID: &str = "bootstrap";

impl AdminIdentity {
    pub fn allows(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|s| s.implies(needed))
    }
}
