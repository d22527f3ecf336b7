//! Secrets and their digests, in one place: the SHA-256 a secret is stored and looked up by
//! (client keys, admin tokens, console sessions), lower-case hex, and the random secrets and
//! ids Tollgate issues (`tg-` client keys, `tga-` admin tokens, `whsec_` webhook secrets).
//!
//! It owns no table and no policy: the store keeps the digests, the gateway compares them.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// SHA-256 of a secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hex SHA-256 of a secret: what the database stores and is searched by.
pub fn stored_digest(secret: &str) -> String {
    hex(&digest(secret))
}

/// `bytes` random bytes in hex.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex(&b)
}

/// A new secret key (`tg-` + 256 random bits in hex) and its id (`key_` + 64 random bits):
/// `(id, secret)`.
pub fn new_key() -> (String, String) {
    let secret = random_hex(32);
    let id = random_hex(8);
    (format!("key_{id}"), format!("tg-{secret}"))
}

/// A new admin token (`tga-` + 256 random bits in hex) and its id (`adm_` + 64 random bits):
/// `(id, secret)`.
pub fn new_admin_token() -> (String, String) {
    let secret = random_hex(32);
    let id = random_hex(8);
    (format!("adm_{id}"), format!("tga-{secret}"))
}

/// A new webhook secret: `whsec_` and 256 random bits in hex.
pub fn new_webhook_secret() -> String {
    format!("whsec_{}", random_hex(32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256_in_lower_case_hex() {
        assert_eq!(
            stored_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }

    #[test]
    fn issued_secrets_have_their_prefixes_and_lengths() {
        let (id, secret) = new_key();
        assert!(id.starts_with("key_") && id.len() == 4 + 16, "{id}");
        assert!(
            secret.starts_with("tg-") && secret.len() == 3 + 64,
            "{secret}"
        );
        let (id, secret) = new_admin_token();
        assert!(id.starts_with("adm_") && id.len() == 4 + 16, "{id}");
        assert!(
            secret.starts_with("tga-") && secret.len() == 4 + 64,
            "{secret}"
        );
        let secret = new_webhook_secret();
        assert!(
            secret.starts_with("whsec_") && secret.len() == 6 + 64,
            "{secret}"
        );
        assert_ne!(new_webhook_secret(), secret);
    }

    #[test]
    fn new_keys_are_long_and_distinct() {
        let (id1, k1) = new_key();
        let (id2, k2) = new_key();
        assert_ne!(k1, k2);
        assert_ne!(id1, id2);
        assert_eq!(k1.len(), 3 + 64);
    }
}
