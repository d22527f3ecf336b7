//! Client authentication: `Authorization: Bearer <key>` → the calling customer and key.
//!
//! Keys are stored only as SHA-256 digests and looked up by digest, so no comparison ever walks
//! a secret; the stored digest is then compared in constant time. Two sources:
//! - static keys from `TOLLGATE_API_KEYS` (the built-in `default` customer), and
//! - keys issued through the admin API, looked up in the database. A lookup is reused for
//!   [`KEY_FRESH`]; after that, until [`KEY_MAX_AGE`], the next request is still served from it
//!   while one background lookup refreshes it, and beyond that a request waits for a new
//!   lookup (both lifetimes are `[server]` settings, [`KeyCache::of`]). So a busy key costs the
//!   database a few lookups a second per replica, none of them on a request's path; a key
//!   revoked (or a customer changed) through this process is forgotten at once, and one revoked
//!   through another replica or the CLI is refused within [`KEY_MAX_AGE`] (under a second). If
//!   the database is unreachable, a key seen before is served from its last successful lookup
//!   (the gateway keeps serving during an outage).
//!
//! The middleware (`middleware.rs`) also puts the `x-ratelimit-*` headers on every
//! authenticated response.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

use crate::clock::Clock;
use crate::error::ApiError;
use tollgate_metering::kinds::ServiceTier;
use tollgate_metering::limits::Limits;
use tollgate_metering::store::{
    now_micros, ApiKey, Customer, Store, StoreError, MAX_SCHEDULING_WEIGHT,
};

/// The customer static keys belong to.
pub const DEFAULT_CUSTOMER: &str = "default";

/// The default lifetimes of key lookups: reused as is for [`KEY_FRESH`], served while a
/// background lookup refreshes them until [`KEY_MAX_AGE`] (models.toml `[server]`
/// `key_cache_fresh_ms`, `key_cache_max_age_ms`).
pub use crate::config::{KEY_FRESH, KEY_MAX_AGE};

/// How long key lookups are reused, and the clock that measures it (see the module
/// documentation); tests set a manual clock and advance it, or short lifetimes in models.toml.
#[derive(Debug, Clone)]
pub struct KeyCache {
    /// Reused as is.
    pub fresh: Duration,
    /// Served while a background lookup refreshes it; never beyond.
    pub max_age: Duration,
    pub clock: Clock,
}

impl Default for KeyCache {
    fn default() -> Self {
        Self {
            fresh: KEY_FRESH,
            max_age: KEY_MAX_AGE,
            clock: Clock::default(),
        }
    }
}

impl KeyCache {
    /// The lifetimes `[server]` sets, on the system clock.
    pub fn of(server: &crate::config::ServerConfig) -> Self {
        Self {
            fresh: server.key_fresh,
            max_age: server.key_max_age,
            clock: Clock::default(),
        }
    }
}

/// A database lookup and when it was made.
#[derive(Debug, Clone)]
struct Looked<T> {
    value: T,
    at: Instant,
}

impl<T> Looked<T> {
    fn new(value: T, cache: &KeyCache) -> Self {
        Self {
            value,
            at: cache.clock.now(),
        }
    }

    fn age(&self, cache: &KeyCache) -> Duration {
        cache.clock.now().saturating_duration_since(self.at)
    }

    fn fresh(&self, cache: &KeyCache) -> bool {
        self.age(cache) < cache.fresh
    }

    fn usable(&self, cache: &KeyCache) -> bool {
        self.age(cache) < cache.max_age
    }
}

/// Who is calling: resolved from the API key by the middleware, read by handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub customer_id: String,
    pub key_id: String,
    /// Models the key may use; `None` = all.
    pub models: Option<Vec<String>>,
    pub limits: Limits,
    /// Monthly budget in nano-USD; `None` = unlimited.
    pub budget_nano_usd: Option<i64>,
    /// When the key stops working (Unix micros), also while served from the last lookup.
    pub expires_at: Option<i64>,
    /// The key's default cost-allocation tags, merged into each of its records.
    pub key_tags: Arc<tollgate_metering::tags::Tags>,
    /// The key's own monthly budget in nano-USD; `None` = only the customer's applies.
    pub key_budget_nano_usd: Option<i64>,
    /// Set by the idempotency layer when the request carries an `Idempotency-Key` it runs.
    pub idempotency: Option<crate::idempotency::ticket::Ticket>,
    /// Caps on requests in flight at once: the key's, the customer's (`None` = no cap).
    pub key_max_concurrent: Option<i64>,
    pub customer_max_concurrent: Option<i64>,
    /// The customer's share of an engine when customers compete (1 = equal).
    pub scheduling_weight: u32,
    /// The tier of a request asking `service_tier: "auto"` (or nothing): the key's default,
    /// else the customer's, else `default`.
    pub auto_tier: ServiceTier,
    /// Whether the caller may ask for `priority` (the customer allows it and the key does not
    /// narrow it).
    pub allow_priority: bool,
    /// Set by the batch runner when the request is a line of this batch: it runs and is billed
    /// at the `batch` tier, and its record names the batch.
    pub batch_id: Option<String>,
    /// On a `tollgate worker`: the LoRA adapter the gateway names for the request (the
    /// gateway resolved the model id and its owner; the worker runs the model with it).
    pub forwarded_adapter: Option<crate::backend::AdapterRef>,
}

/// A customer's scheduling weight as the engine takes it (the store keeps it in range).
fn weight(customer: &Customer) -> u32 {
    u32::try_from(customer.scheduling_weight.clamp(1, MAX_SCHEDULING_WEIGHT)).unwrap_or(1)
}

impl Caller {
    fn new(key: &ApiKey, customer: &Customer) -> Self {
        Self {
            customer_id: customer.id.clone(),
            key_id: key.id.clone(),
            models: key.models.clone(),
            limits: Limits {
                key_id: key.id.clone(),
                customer_id: customer.id.clone(),
                key_rpm: key.rpm,
                key_tpm: key.tpm,
                customer_rpm: customer.rpm,
                customer_tpm: customer.tpm,
            },
            budget_nano_usd: customer.budget_nano_usd,
            expires_at: key.expires_at,
            key_tags: Arc::new(key.tags.clone()),
            key_budget_nano_usd: key.budget_nano_usd,
            idempotency: None,
            key_max_concurrent: key.max_concurrent_requests,
            customer_max_concurrent: customer.max_concurrent_requests,
            scheduling_weight: weight(customer),
            auto_tier: key.auto_tier(customer),
            allow_priority: key.may_ask_priority(customer),
            batch_id: None,
            forwarded_adapter: None,
        }
    }

    /// What a request of this caller is counted against for concurrency.
    pub fn request_caps(&self) -> crate::concurrency::RequestCaps<'_> {
        crate::concurrency::RequestCaps {
            customer: &self.customer_id,
            customer_cap: self.customer_max_concurrent,
            key: &self.key_id,
            key_cap: self.key_max_concurrent,
        }
    }

    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

mod by_id;
pub mod middleware;

use tollgate_metering::secrets::{digest, hex};

/// The keys clients may use and where to look them up.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Static keys: digest → key id.
    statics: Arc<HashMap<[u8; 32], String>>,
    /// Last successful database lookups: reused while fresh, and during outages.
    last_known: Arc<Mutex<HashMap<[u8; 32], Looked<Caller>>>>,
    /// The `default` customer (limits and budget of the static keys) as last read; `None`
    /// inside when it does not exist.
    last_default: Arc<Mutex<Option<Looked<Option<Customer>>>>>,
    /// Bumped by every `forget_*`: a lookup that started before one is not kept (it may have
    /// read the key before its revocation).
    generation: Arc<AtomicU64>,
    /// Keys being refreshed in the background (one lookup at a time per key).
    refreshing: Arc<Mutex<HashSet<[u8; 32]>>>,
    /// The `default` customer is being refreshed in the background.
    refreshing_default: Arc<AtomicBool>,
    /// A `tollgate worker`: callers (the gateways holding its token) name the customer each
    /// request is for and its scheduling weight.
    trusts_forwarded_customer: bool,
    cache: KeyCache,
}

impl AuthConfig {
    pub fn from_keys<I: IntoIterator<Item = S>, S: AsRef<str>>(keys: I) -> Self {
        let statics = keys
            .into_iter()
            .map(|k| k.as_ref().trim().to_string())
            .filter(|k| !k.is_empty())
            .map(|k| {
                let d = digest(&k);
                // A stable id that does not reveal the key.
                (d, format!("key_static_{}", &hex(&d)[..12]))
            })
            .collect();
        Self {
            statics: Arc::new(statics),
            last_known: Arc::default(),
            last_default: Arc::default(),
            generation: Arc::default(),
            refreshing: Arc::default(),
            refreshing_default: Arc::default(),
            trusts_forwarded_customer: false,
            cache: KeyCache::default(),
        }
    }

    /// Key lookups reused for other lifetimes, or measured by another clock.
    pub fn with_key_cache(mut self, cache: KeyCache) -> Self {
        self.cache = cache;
        self
    }

    /// For a `tollgate worker`, whose only key is the token its gateways hold: each request's
    /// customer and scheduling weight come from the headers the gateway forwards.
    pub fn trusting_forwarded_customer(mut self) -> Self {
        self.trusts_forwarded_customer = true;
        self
    }

    /// `TOLLGATE_API_KEYS=key1,key2`: static keys of the built-in `default` customer.
    pub fn from_env() -> Self {
        let keys = std::env::var("TOLLGATE_API_KEYS").unwrap_or_default();
        Self::from_keys(keys.split(','))
    }

    pub fn has_static_keys(&self) -> bool {
        !self.statics.is_empty()
    }

    /// Resolves a presented key to its caller.
    pub async fn resolve(&self, store: Option<&Store>, key: &str) -> Result<Caller, ApiError> {
        let d = digest(key);
        if let Some(key_id) = self.statics.get(&d) {
            return Ok(self.static_caller(store, key_id).await);
        }
        let Some(store) = store else {
            return Err(ApiError::InvalidApiKey("incorrect API key provided".into()));
        };
        let known = lock(&self.last_known).get(&d).cloned();
        match &known {
            Some(k) if k.fresh(&self.cache) => return unexpired(k.value.clone()),
            Some(k) if k.usable(&self.cache) => {
                self.refresh_in_background(store, d);
                return unexpired(k.value.clone());
            }
            _ => {}
        }
        self.look_up(store, d, known).await
    }

    /// Starts one background lookup of key `d`, unless one is running.
    fn refresh_in_background(&self, store: &Store, d: [u8; 32]) {
        if !lock(&self.refreshing).insert(d) {
            return;
        }
        let (this, tracked) = (self.clone(), store.clone());
        // Tracked by the store, which waits for it before it closes.
        store.spawn_background(async move {
            let store = tracked;
            let known = lock(&this.last_known).get(&d).cloned();
            // Its outcome reaches requests through `last_known` (or its removal).
            let _ = this.look_up(&store, d, known).await;
            lock(&this.refreshing).remove(&d);
        });
    }

    /// Looks key `d` up in the database and keeps the answer; `known` is the last lookup, served
    /// if the database cannot be reached.
    async fn look_up(
        &self,
        store: &Store,
        d: [u8; 32],
        known: Option<Looked<Caller>>,
    ) -> Result<Caller, ApiError> {
        let hash = hex(&d);
        let generation = self.generation.load(Ordering::Acquire);
        match store.find_key(&hash).await {
            Ok(Some((k, stored, customer))) => {
                if !bool::from(stored.as_bytes().ct_eq(hash.as_bytes())) {
                    return Err(ApiError::InvalidApiKey("incorrect API key provided".into()));
                }
                if k.revoked_at.is_some() {
                    self.forget(&d);
                    return Err(ApiError::InvalidApiKey(
                        "this API key has been revoked".into(),
                    ));
                }
                let caller = Caller::new(&k, &customer);
                let mut known = lock(&self.last_known);
                if self.generation.load(Ordering::Acquire) == generation {
                    known.insert(d, Looked::new(caller.clone(), &self.cache));
                }
                drop(known);
                unexpired(caller)
            }
            Ok(None) => {
                self.forget(&d);
                Err(ApiError::InvalidApiKey("incorrect API key provided".into()))
            }
            Err(e) => match known {
                Some(known) => {
                    tracing::warn!("key lookup failed, serving from the last lookup: {e}");
                    unexpired(known.value)
                }
                None => Err(ApiError::Unavailable(
                    "the API key cannot be verified right now; retry shortly".into(),
                )),
            },
        }
    }

    /// The `default` customer, as keys are: reused for [`KEY_FRESH`], then served while a
    /// background lookup refreshes it, never past [`KEY_MAX_AGE`]; while the database is
    /// unreachable, as last read.
    async fn default_customer(&self, store: &Store) -> Option<Customer> {
        let known = lock(&self.last_default).clone();
        match known {
            Some(k) if k.fresh(&self.cache) => return k.value,
            Some(k) if k.usable(&self.cache) => {
                // Served as read while one background lookup refreshes it.
                if !self.refreshing_default.swap(true, Ordering::AcqRel) {
                    let (this, tracked) = (self.clone(), store.clone());
                    store.spawn_background(async move {
                        this.look_up_default(&tracked).await;
                        this.refreshing_default.store(false, Ordering::Release);
                    });
                }
                return k.value;
            }
            _ => {}
        }
        self.look_up_default(store).await
    }

    /// Reads the `default` customer and keeps it; as last read if the database cannot answer.
    async fn look_up_default(&self, store: &Store) -> Option<Customer> {
        let generation = self.generation.load(Ordering::Acquire);
        let found = match store.customer(DEFAULT_CUSTOMER).await {
            Ok(c) => Some(c),
            // Not created yet: no limits.
            Err(StoreError::NotFound(_)) => None,
            // Unreachable: the limits as last read.
            Err(_) => {
                return lock(&self.last_default)
                    .as_ref()
                    .and_then(|k| k.value.clone())
            }
        };
        let mut last = lock(&self.last_default);
        if self.generation.load(Ordering::Acquire) == generation {
            *last = Some(Looked::new(found.clone(), &self.cache));
        }
        found
    }

    /// Forgets the lookups of key `key_id` (revoked through this process: refused at once).
    pub fn forget_key(&self, key_id: &str) {
        let mut known = lock(&self.last_known);
        self.generation.fetch_add(1, Ordering::AcqRel);
        known.retain(|_, k| k.value.key_id != key_id);
    }

    /// Forgets the lookups of `customer_id`'s keys (its limits or budget changed).
    pub fn forget_customer(&self, customer_id: &str) {
        let mut known = lock(&self.last_known);
        self.generation.fetch_add(1, Ordering::AcqRel);
        known.retain(|_, k| k.value.customer_id != customer_id);
        drop(known);
        if customer_id == DEFAULT_CUSTOMER {
            *lock(&self.last_default) = None;
        }
    }

    fn forget(&self, d: &[u8; 32]) {
        lock(&self.last_known).remove(d);
    }
}

/// The caller, unless its key has expired (checked on every request, also when the lookup is
/// reused).
fn unexpired(caller: Caller) -> Result<Caller, ApiError> {
    if caller.expires_at.is_some_and(|t| t <= now_micros()) {
        return Err(ApiError::InvalidApiKey("this API key has expired".into()));
    }
    Ok(caller)
}

/// Short sections over plain maps, never held across an `.await`.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A gateway's forwarded customer, weight, service tier and LoRA adapter, for the caller of a
/// worker: the gateway resolved and checked the tier, so the worker serves its requests at it
/// (and at any tier the gateway asks for, `priority` included), and the adapter (whose path the
/// worker reads).
fn forwarded_customer(caller: &mut Caller, headers: &HeaderMap) -> Result<(), ApiError> {
    use crate::backend::upstream::{
        forwarded_adapter, CUSTOMER_HEADER, TIER_HEADER, WEIGHT_HEADER,
    };
    caller.allow_priority = true;
    caller.forwarded_adapter = forwarded_adapter(headers)
        .map_err(|header| ApiError::invalid(format!("`{header}` is malformed"), header))?;
    if let Some(v) = headers.get(TIER_HEADER) {
        caller.auto_tier = v
            .to_str()
            .ok()
            .and_then(|t| t.parse::<ServiceTier>().ok())
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("`{TIER_HEADER}` must be a service tier"),
                    TIER_HEADER,
                )
            })?;
    }
    if let Some(v) = headers.get(CUSTOMER_HEADER) {
        let id = v
            .to_str()
            .ok()
            .filter(|id| tollgate_metering::store::valid_id(id))
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("`{CUSTOMER_HEADER}` must be a customer id"),
                    CUSTOMER_HEADER,
                )
            })?;
        caller.customer_id = id.to_string();
    }
    if let Some(v) = headers.get(WEIGHT_HEADER) {
        let weight = v
            .to_str()
            .ok()
            .and_then(|w| w.parse::<u32>().ok())
            .filter(|w| (1..=MAX_SCHEDULING_WEIGHT).contains(&i64::from(*w)))
            .ok_or_else(|| {
                ApiError::invalid(
                    format!(
                        "`{WEIGHT_HEADER}` must be an integer from 1 to {MAX_SCHEDULING_WEIGHT}"
                    ),
                    WEIGHT_HEADER,
                )
            })?;
        caller.scheduling_weight = weight;
    }
    Ok(())
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    h.strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
        .map(str::trim)
}

/// OpenAI's reset format: `1s`, `6m0s`, `20ms`.
fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    // Whole seconds, rounded up.
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests;
