//! The operators' console's signed-in sessions, kept in this process (logging out ends one at
//! once): who signed in with which admin credential, and each session's CSRF token. A leaf:
//! the state holds the sessions, the console (`console/`) signs in and out through them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::api::admin_tokens::identity::{AdminIdentity, Scope};
use tollgate_metering::secrets::{digest, hex};

/// How long a session lasts after signing in.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Names the session in the audit log (the cookie itself is never written anywhere).
    pub public_id: String,
    /// Sent back by every state-changing form.
    pub csrf: String,
    /// The admin credential it signed in with: `bootstrap` or an issued token's id (a revoked
    /// token's sessions end at their next request).
    pub token_id: String,
    /// What that credential may do (shown on every screen).
    pub scopes: Vec<Scope>,
    expires: Instant,
}

/// The sessions of this process, by the SHA-256 of their cookie (a leaked memory dump or log
/// line of this map does not give a usable cookie).
pub struct Sessions {
    ttl: Duration,
    /// Held for a lookup or an insert, never across an `.await`.
    by_digest: Mutex<HashMap<String, Session>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::with_ttl(SESSION_TTL)
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex(&b)
}

impl Sessions {
    pub fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            by_digest: Mutex::default(),
        }
    }

    /// Starts a session for `identity`; returns its cookie value and the session.
    pub fn create(&self, identity: AdminIdentity) -> (String, Session) {
        let cookie = random_hex(32);
        let session = Session {
            public_id: format!("sess_{}", random_hex(6)),
            csrf: random_hex(32),
            token_id: identity.token_id,
            scopes: identity.scopes,
            expires: Instant::now() + self.ttl,
        };
        if let Ok(mut map) = self.by_digest.lock() {
            let now = Instant::now();
            map.retain(|_, s| s.expires > now);
            map.insert(hex(&digest(&cookie)), session.clone());
        }
        (cookie, session)
    }

    /// The live session of this cookie value.
    pub fn get(&self, cookie: &str) -> Option<Session> {
        let map = self.by_digest.lock().ok()?;
        map.get(&hex(&digest(cookie)))
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }

    /// Ends the session of this cookie value.
    pub fn end(&self, cookie: &str) {
        if let Ok(mut map) = self.by_digest.lock() {
            map.remove(&hex(&digest(cookie)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::admin_tokens::identity::BOOTSTRAP_ID;

    fn bootstrap() -> AdminIdentity {
        AdminIdentity {
            token_id: BOOTSTRAP_ID.into(),
            scopes: vec![Scope::Admin],
        }
    }

    #[test]
    fn sessions_expire_and_end() {
        let sessions = Sessions::with_ttl(Duration::from_secs(60));
        let (cookie, s) = sessions.create(bootstrap());
        assert_eq!(sessions.get(&cookie).unwrap().public_id, s.public_id);
        assert!(sessions.get("forged").is_none());
        sessions.end(&cookie);
        assert!(sessions.get(&cookie).is_none());

        let expired = Sessions::with_ttl(Duration::ZERO);
        let (cookie, _) = expired.create(bootstrap());
        assert!(
            expired.get(&cookie).is_none(),
            "a session past its time is refused"
        );
    }
}
