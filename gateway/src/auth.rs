//! Client authentication: `Authorization: Bearer <key>` checked against the configured keys.
//!
//! Keys are kept only as SHA-256 digests and looked up by digest, so the comparison never walks
//! the secret byte by byte. (Customers and their keys in a database come with billing.)

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::AppState;

/// The keys clients may use.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    digests: Arc<HashSet<[u8; 32]>>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl AuthConfig {
    pub fn from_keys<I: IntoIterator<Item = S>, S: AsRef<str>>(keys: I) -> Self {
        let digests = keys
            .into_iter()
            .map(|k| k.as_ref().trim().to_string())
            .filter(|k| !k.is_empty())
            .map(|k| digest(&k))
            .collect();
        Self {
            digests: Arc::new(digests),
        }
    }

    /// `TOLLGATE_API_KEYS=key1,key2`: static keys of the built-in `default` customer.
    pub fn from_env() -> Self {
        let keys = std::env::var("TOLLGATE_API_KEYS").unwrap_or_default();
        let auth = Self::from_keys(keys.split(','));
        if auth.digests.is_empty() {
            tracing::warn!(
                "TOLLGATE_API_KEYS is empty: every API request will be refused with 401"
            );
        }
        auth
    }

    pub fn check(&self, key: &str) -> bool {
        self.digests.contains(&digest(key))
    }
}

/// Middleware for the `/v1` routes.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let key = header.and_then(|h| {
        h.strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
    });
    match key {
        None => ApiError::InvalidApiKey(
            "you didn't provide an API key: send `Authorization: Bearer <key>`".into(),
        )
        .into_response(),
        Some(key) if !state.auth.check(key.trim()) => {
            ApiError::InvalidApiKey("incorrect API key provided".into()).into_response()
        }
        Some(_) => next.run(request).await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn checks_keys_by_digest() {
        let a = AuthConfig::from_keys(["k1", " k2 ", ""]);
        assert!(a.check("k1") && a.check("k2"));
        assert!(!a.check("") && !a.check("k3"));
    }
}
