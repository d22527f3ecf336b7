//! LoRA adapters through a pool of `tollgate worker`s: the headers that name a request's
//! adapter to the member it goes to (trusted by a worker only from the holder of its token,
//! as the forwarded customer is), which adapters each member holds (its `/health` says, and a
//! member that accepts a request with an adapter is noted as holding it at once), and the
//! preference for a member that holds the request's adapter among the healthy members under
//! the load bound; the others follow in the pool's usual order (one of them then loads it).
//!
//! It does not load adapters (the worker's engine does, `local::adapters` in the binary) nor
//! decide the usual order (`super`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::Value;

use super::{load_bound, Member};
use crate::backend::AdapterRef;

/// The adapter's name: the worker's own adapter of that name when no path comes with it.
pub const ADAPTER_HEADER: &str = "x-tollgate-adapter";
/// The adapter's directory, as the unpadded base64url of its bytes (any path fits a header):
/// the worker reads the adapter's files there.
pub const ADAPTER_PATH_HEADER: &str = "x-tollgate-adapter-path";

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// The headers that name `adapter` to a worker.
pub(super) fn headers(adapter: &AdapterRef) -> Vec<(&'static str, String)> {
    let mut out = vec![(ADAPTER_HEADER, adapter.name.clone())];
    if let Some(path) = &adapter.path {
        out.push((
            ADAPTER_PATH_HEADER,
            b64().encode(path.as_os_str().as_encoded_bytes()),
        ));
    }
    out
}

/// The adapter a gateway names in `headers`, for a worker; `Err` names the malformed header.
/// A name is 1-64 letters, digits, `-`, `_`, `.`; a path is absolute.
pub fn forwarded(headers: &http::HeaderMap) -> Result<Option<AdapterRef>, &'static str> {
    let Some(name) = headers.get(ADAPTER_HEADER) else {
        return match headers.get(ADAPTER_PATH_HEADER) {
            Some(_) => Err(ADAPTER_HEADER),
            None => Ok(None),
        };
    };
    let name = name
        .to_str()
        .ok()
        .filter(|n| tollgate_metering::store::valid_id(n))
        .ok_or(ADAPTER_HEADER)?;
    let path = match headers.get(ADAPTER_PATH_HEADER) {
        None => None,
        Some(v) => {
            let bytes = b64()
                .decode(v.as_bytes())
                .map_err(|_| ADAPTER_PATH_HEADER)?;
            match path_of(bytes) {
                Some(path) if path.is_absolute() => Some(path),
                _ => return Err(ADAPTER_PATH_HEADER),
            }
        }
    };
    Ok(Some(AdapterRef {
        name: name.to_string(),
        path,
    }))
}

/// The path of `bytes` as a gateway encoded them.
fn path_of(bytes: Vec<u8>) -> Option<PathBuf> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        Some(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
    }
    #[cfg(not(unix))]
    {
        String::from_utf8(bytes).ok().map(PathBuf::from)
    }
}

/// The adapter keys (`crate::backend::adapter_key`) a worker's `/health` answer lists for
/// `model`; none when the answer is not a worker's.
pub(super) fn listed(health: &Value, model: &str) -> HashSet<String> {
    let models = health["models"].as_array().into_iter().flatten();
    models
        .filter(|m| m["id"] == model)
        .flat_map(|m| m["adapters"].as_array().into_iter().flatten())
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect()
}

impl Member {
    /// Whether the member holds the adapter of `key`, as last heard.
    pub(super) fn holds(&self, key: &str) -> bool {
        self.adapters().contains(key)
    }

    /// The member accepted a request with the adapter of `key`: it holds it now.
    pub(super) fn note_adapter(&self, key: &str) {
        let mut held = self.adapters();
        if !held.contains(key) {
            held.insert(key.to_string());
        }
    }

    /// What the member's `/health` says it holds.
    pub(super) fn set_adapters(&self, listed: HashSet<String>) {
        *self.adapters() = listed;
    }

    fn adapters(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A short section over a set; never held across an `.await`.
        self.adapters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Moves to the front, keeping their order, the healthy members that hold the adapter of
/// `key` and carry fewer requests than the load bound; the rest keep their order behind them.
pub(super) fn prefer_holders(order: &mut [Arc<Member>], key: &str) {
    let bound = load_bound(order);
    order.sort_by_cached_key(|m| {
        let ready = m.healthy.load(Ordering::Relaxed)
            && f64::from(m.in_flight.load(Ordering::Relaxed)) < bound
            && m.holds(key);
        !ready
    });
}
