//! `models.toml`: the catalogue of models clients may call, and server limits.
//!
//! Two phases: raw serde structs that reject unknown keys (a typo is an error naming the key),
//! then validated structs with defaults filled in, relative paths resolved against the file's
//! directory and prices parsed as exact decimals. Secrets never live here (only the names of
//! environment variables that hold them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod adapters;
mod models;
mod prices;
#[cfg(test)]
mod tests;

pub use adapters::{
    adapter_model, adapter_prices, check_adapter_base, local_adapter_dir, AdapterConfig, PriceError,
};
use models::{validate_model, RawModel};
pub use models::{
    BackendConfig, DeviceSpec, Discovery, HttpBackendConfig, KvCacheDtype, LocalBackendConfig,
    ModelConfig, ModelSource, ReservedCapacity, ResponsesMode, Routing, WeightForm,
    DEFAULT_FLEX_MAX_WAIT_SECS,
};

/// Errors loading the catalogue.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("model `{model}`: {message}")]
    Model { model: String, message: String },
    #[error("no models configured: add a [models.\"<id>\"] table")]
    NoModels,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    max_body_bytes: Option<usize>,
    max_n: Option<u32>,
    shutdown_timeout_secs: Option<u64>,
    response_retention_days: Option<u32>,
    header_read_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
    max_inflight_requests: Option<usize>,
    idempotency_lease_ms: Option<u64>,
    key_cache_fresh_ms: Option<u64>,
    key_cache_max_age_ms: Option<u64>,
    priority_ttft_target_ms: Option<u64>,
    sse_keep_alive_secs: Option<u64>,
    files_quota_bytes: Option<u64>,
    model_memory_bytes: Option<u64>,
    batch_concurrency: Option<usize>,
    batch_lease_secs: Option<u64>,
}

/// The validated catalogue.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// By model id.
    pub models: BTreeMap<String, ModelConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Largest `n` accepted.
    pub max_n: u32,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// How long stored Responses API objects are kept.
    pub response_retention: Duration,
    /// A connection must send a whole request head within this long of being ready for one
    /// (new or idle keep-alive connections alike), else it is closed.
    pub header_read_timeout: Duration,
    /// Connections open at once per listener; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Requests of the OpenAI API served at once (streams until their end); beyond, 503 with
    /// `Retry-After` at once. Below `max_connections` by default, so the gateway sheds load with
    /// answers before it must close connections.
    pub max_inflight_requests: usize,
    /// How long a request running under an `Idempotency-Key` holds it without renewing
    /// (renewed every third of it); a run that loses it stops and is not charged.
    pub idempotency_lease: Duration,
    /// `key_cache_fresh_ms` (400 by default): how long a database lookup of an API key (or of
    /// the `default` customer) is reused as is.
    pub key_fresh: Duration,
    /// `key_cache_max_age_ms` (900 by default, at least `key_cache_fresh_ms`): how long a lookup
    /// may still serve requests while one background lookup refreshes it. A key revoked or
    /// changed elsewhere (another replica, the CLI) is refused or seen within this; 0 looks a
    /// key up on every request.
    pub key_max_age: Duration,
    /// `priority_ttft_target_ms` (1000 by default): the time to first token the SLA report
    /// counts `priority` requests against.
    pub priority_ttft_target_ms: u64,
    /// `sse_keep_alive_secs` (15 by default): a stream with nothing to send for this long (a
    /// request queued, or paused while a higher class runs) gets an SSE comment line
    /// (`: keep-alive`), so clients and proxies keep it open.
    pub sse_keep_alive: Duration,
    /// `files_quota_bytes` (10 GB by default): the bytes of unexpired files (Files API) each
    /// customer may keep; an upload past it is refused.
    pub files_quota_bytes: u64,
    /// `model_memory_bytes`: what the local models loaded at once may take (weights file plus
    /// KV reservation each); `None`: the machine's available memory less a margin, measured
    /// at start by the binary.
    pub model_memory_bytes: Option<u64>,
    /// `batch_concurrency` (32 by default, at least 1): lines of Batch API batches one replica
    /// runs at once (they run in the engine's `batch` class, on what other classes leave).
    pub batch_concurrency: usize,
    /// `batch_lease_secs` (60 by default, at least 3): how long a replica's claim on a batch
    /// line lasts unless renewed (it is, every third of it, while the line runs); a line whose
    /// replica died is run again after this.
    pub batch_lease: Duration,
}

impl ServerConfig {
    /// The keep-alive of every server-sent event stream: `: keep-alive` after
    /// `sse_keep_alive` without an event.
    pub fn keep_alive(&self) -> axum::response::sse::KeepAlive {
        axum::response::sse::KeepAlive::new()
            .interval(self.sse_keep_alive)
            .text("keep-alive")
    }
}

/// The default of `key_cache_fresh_ms`.
pub const KEY_FRESH: Duration = Duration::from_millis(400);
/// The default of `key_cache_max_age_ms`.
pub const KEY_MAX_AGE: Duration = Duration::from_millis(900);

/// `batch_concurrency` (at least 1) and `batch_lease_secs` (at least 3), or their defaults.
fn batch_settings(raw: &RawServer, defaults: &ServerConfig) -> (usize, Duration) {
    (
        raw.batch_concurrency
            .map_or(defaults.batch_concurrency, |n| n.max(1)),
        raw.batch_lease_secs
            .map_or(defaults.batch_lease, |s| Duration::from_secs(s.max(3))),
    )
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_n: 8,
            shutdown_timeout: Duration::from_secs(30),
            response_retention: Duration::from_secs(30 * 86_400),
            header_read_timeout: Duration::from_secs(30),
            max_connections: 2048,
            max_inflight_requests: 1792,
            idempotency_lease: Duration::from_secs(30),
            key_fresh: KEY_FRESH,
            key_max_age: KEY_MAX_AGE,
            priority_ttft_target_ms: 1_000,
            sse_keep_alive: Duration::from_secs(15),
            files_quota_bytes: 10_000_000_000,
            model_memory_bytes: None,
            batch_concurrency: 32,
            batch_lease: Duration::from_secs(60),
        }
    }
}

/// Each model of the file and its adapters' model ids (`<id>:<name>`), by id.
fn validate_models(
    raw: BTreeMap<String, RawModel>,
    base_dir: &Path,
) -> Result<BTreeMap<String, ModelConfig>, ConfigError> {
    let mut models: BTreeMap<String, ModelConfig> = BTreeMap::new();
    for (id, mut m) in raw {
        let raw_adapters = m.adapters.take().unwrap_or_default();
        let model = validate_model(&id, m, base_dir)?;
        let adapters = adapters::validate_adapters(&model, raw_adapters, base_dir)?;
        for model in std::iter::once(model).chain(adapters) {
            if models.contains_key(&model.id) {
                return Err(ConfigError::Model {
                    message: "the id is both a model's and an adapter's (`<base>:<name>`)".into(),
                    model: model.id,
                });
            }
            models.insert(model.id.clone(), model);
        }
    }
    Ok(models)
}

impl Config {
    /// Reads and validates a catalogue file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, base).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses a catalogue; relative paths are resolved against `base_dir`.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        if raw.models.is_empty() {
            return Err(ConfigError::NoModels);
        }
        let defaults = ServerConfig::default();
        let (batch_concurrency, batch_lease) = batch_settings(&raw.server, &defaults);
        let server = ServerConfig {
            max_body_bytes: raw.server.max_body_bytes.unwrap_or(defaults.max_body_bytes),
            max_n: raw.server.max_n.unwrap_or(defaults.max_n).max(1),
            shutdown_timeout: raw
                .server
                .shutdown_timeout_secs
                .map_or(defaults.shutdown_timeout, Duration::from_secs),
            response_retention: raw
                .server
                .response_retention_days
                .map_or(defaults.response_retention, |d| {
                    Duration::from_secs(u64::from(d) * 86_400)
                }),
            header_read_timeout: raw
                .server
                .header_read_timeout_secs
                .map_or(defaults.header_read_timeout, |s| {
                    Duration::from_secs(s.max(1))
                }),
            max_connections: raw
                .server
                .max_connections
                .unwrap_or(defaults.max_connections)
                .max(1),
            max_inflight_requests: raw
                .server
                .max_inflight_requests
                .unwrap_or(defaults.max_inflight_requests)
                .max(1),
            idempotency_lease: raw
                .server
                .idempotency_lease_ms
                .map_or(defaults.idempotency_lease, |ms| {
                    Duration::from_millis(ms.max(30))
                }),
            key_fresh: raw
                .server
                .key_cache_fresh_ms
                .map_or(defaults.key_fresh, Duration::from_millis),
            key_max_age: raw
                .server
                .key_cache_max_age_ms
                .map_or(defaults.key_max_age, Duration::from_millis),
            priority_ttft_target_ms: raw
                .server
                .priority_ttft_target_ms
                .unwrap_or(defaults.priority_ttft_target_ms),
            sse_keep_alive: raw
                .server
                .sse_keep_alive_secs
                .map_or(defaults.sse_keep_alive, |s| Duration::from_secs(s.max(1))),
            files_quota_bytes: raw
                .server
                .files_quota_bytes
                .unwrap_or(defaults.files_quota_bytes),
            model_memory_bytes: raw.server.model_memory_bytes,
            batch_concurrency,
            batch_lease,
        };
        if server.key_fresh > server.key_max_age {
            return Err(ConfigError::Parse(format!(
                "[server] key_cache_fresh_ms ({}) exceeds key_cache_max_age_ms ({}): a lookup cannot be reused as is for longer than it may serve at all",
                server.key_fresh.as_millis(),
                server.key_max_age.as_millis()
            )));
        }
        let models = validate_models(raw.models, base_dir)?;
        Ok(Self { server, models })
    }
}
