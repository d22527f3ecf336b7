//! `models.toml`: the catalogue of models clients may call, and server limits.
//!
//! Two phases: raw serde structs that reject unknown keys (a typo is an error naming the key),
//! then validated structs with defaults filled in, relative paths resolved against the file's
//! directory and prices parsed as exact decimals. Secrets never live here (only the names of
//! environment variables that hold them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;
use tollgate_metering::money::Price;

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    source: Option<RawSource>,
    backend: RawBackend,
    context_length: Option<u32>,
    owned_by: Option<String>,
    price: Option<RawPrice>,
    max_sequences_per_customer: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    path: Option<PathBuf>,
    hf_repo: Option<String>,
    revision: Option<String>,
    file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum RawBackend {
    Local {
        device: Option<String>,
        weights: Option<String>,
        max_queue: Option<usize>,
        max_batch_tokens: Option<usize>,
        kv_cache_bytes: Option<usize>,
        kv_cache_dtype: Option<KvCacheDtype>,
        /// A Jinja file that replaces the model's own chat template.
        chat_template: Option<PathBuf>,
    },
    Http {
        urls: Vec<String>,
        api_key_env: Option<String>,
        /// `static` (default) or `dns`.
        discover: Option<String>,
        /// `translate` (default) or `passthrough`.
        responses: Option<String>,
        /// Send each request's customer and scheduling weight to the members (only for
        /// `tollgate worker`s, which trust them from their token's holder).
        forward_customer: Option<bool>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input_per_mtok: String,
    output_per_mtok: String,
    /// Prompt tokens served from a prefix cache; the input price when absent.
    cached_input_per_mtok: Option<String>,
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
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub id: String,
    /// Where the weights come from; `None` only for http backends (the upstream has them).
    pub source: Option<ModelSource>,
    pub backend: BackendConfig,
    /// Limit of the context below the model's own.
    pub context_length: Option<u32>,
    pub owned_by: String,
    pub price: Price,
    /// Sequences one customer may have in flight on this model (429 beyond).
    pub max_sequences_per_customer: Option<u32>,
}

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A `.gguf` file or a safetensors directory (resolved against the config's directory).
    Path(PathBuf),
    Hub {
        repo: String,
        revision: String,
        file: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Local(LocalBackendConfig),
    Http(HttpBackendConfig),
}

/// What a local model's KV cache holds keys and values as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    F32,
    F16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBackendConfig {
    pub device: String,
    pub weights: String,
    pub max_queue: usize,
    pub max_batch_tokens: usize,
    pub kv_cache_bytes: usize,
    /// The KV cache's element type; `None` = the device's default (f32 on the CPU).
    pub kv_cache_dtype: Option<KvCacheDtype>,
    /// A chat template file used instead of the one the model ships (resolved against the
    /// config's directory), as vLLM's `--chat-template` and llama.cpp's
    /// `--chat-template-file`.
    pub chat_template: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBackendConfig {
    pub urls: Vec<String>,
    pub api_key_env: Option<String>,
    /// How the pool's members are found from `urls`.
    pub discover: crate::backend::upstream::Discovery,
    /// How `/v1/responses` reaches the upstream.
    pub responses: ResponsesMode,
    /// Whether members get each request's customer and scheduling weight (headers
    /// [`crate::backend::upstream::CUSTOMER_HEADER`] and
    /// [`crate::backend::upstream::WEIGHT_HEADER`]): for pools of `tollgate worker`s.
    pub forward_customer: bool,
}

/// How an http model serves `/v1/responses`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ResponsesMode {
    /// Translated to chat completions (any OpenAI-compatible upstream).
    #[default]
    Translate,
    /// Sent to the upstream's own `/v1/responses` (it speaks the Responses API).
    Passthrough,
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
        };
        let mut models = BTreeMap::new();
        for (id, m) in raw.models {
            let model = validate_model(&id, m, base_dir)?;
            models.insert(id, model);
        }
        Ok(Self { server, models })
    }
}

fn validate_source(source: RawSource, base_dir: &Path) -> Result<ModelSource, String> {
    match (source.path, source.hf_repo) {
        (Some(path), None) => {
            if source.revision.is_some() || source.file.is_some() {
                return Err(
                    "source.revision and source.file go with source.hf_repo, not source.path"
                        .into(),
                );
            }
            Ok(ModelSource::Path(if path.is_absolute() {
                path
            } else {
                base_dir.join(path)
            }))
        }
        (None, Some(repo)) => Ok(ModelSource::Hub {
            repo,
            revision: source.revision.unwrap_or_else(|| "main".into()),
            file: source.file,
        }),
        (Some(_), Some(_)) => Err("source has both `path` and `hf_repo`; choose one".into()),
        (None, None) => Err("source needs `path` or `hf_repo`".into()),
    }
}

fn validate_model(id: &str, m: RawModel, base_dir: &Path) -> Result<ModelConfig, ConfigError> {
    let err = |message: String| ConfigError::Model {
        model: id.to_string(),
        message,
    };
    if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err(
            "model ids must be non-empty and contain no spaces".into()
        ));
    }
    let source = match m.source {
        Some(source) => Some(validate_source(source, base_dir).map_err(err)?),
        None if matches!(m.backend, RawBackend::Http { .. }) => None,
        None => {
            return Err(err(
                "source is missing: a local backend needs `source = { path = ... }` or `{ hf_repo = ... }`"
                    .into(),
            ))
        }
    };
    let backend = match m.backend {
        RawBackend::Local {
            device,
            weights,
            max_queue,
            max_batch_tokens,
            kv_cache_bytes,
            kv_cache_dtype,
            chat_template,
        } => BackendConfig::Local(LocalBackendConfig {
            device: device.unwrap_or_else(|| "cpu".into()),
            weights: weights.unwrap_or_else(|| "auto".into()),
            max_queue: max_queue.unwrap_or(64).max(1),
            max_batch_tokens: max_batch_tokens.unwrap_or(512).max(1),
            kv_cache_bytes: kv_cache_bytes.unwrap_or(4 << 30),
            kv_cache_dtype,
            chat_template: chat_template.map(|p| base_dir.join(p)),
        }),
        RawBackend::Http {
            urls,
            api_key_env,
            discover,
            responses,
            forward_customer,
        } => {
            if urls.is_empty() {
                return Err(err("backend.urls is empty".into()));
            }
            let discover = match discover.as_deref() {
                None | Some("static") => crate::backend::upstream::Discovery::Static,
                Some("dns") => crate::backend::upstream::Discovery::Dns,
                Some(other) => {
                    return Err(err(format!(
                        "backend.discover `{other}` is neither `static` nor `dns`"
                    )))
                }
            };
            let responses = match responses.as_deref() {
                None | Some("translate") => ResponsesMode::Translate,
                Some("passthrough") => ResponsesMode::Passthrough,
                Some(other) => {
                    return Err(err(format!(
                        "backend.responses `{other}` is neither `translate` nor `passthrough`"
                    )))
                }
            };
            BackendConfig::Http(HttpBackendConfig {
                urls,
                api_key_env,
                discover,
                responses,
                forward_customer: forward_customer.unwrap_or(false),
            })
        }
    };
    let price = match m.price {
        None => Price::default(),
        Some(p) => {
            let parse = |key: &str, v: &str| -> Result<Decimal, ConfigError> {
                let d = Decimal::from_str(v.trim())
                    .map_err(|e| err(format!("price.{key} `{v}` is not a decimal number: {e}")))?;
                if d.is_sign_negative() {
                    return Err(err(format!("price.{key} `{v}` is negative")));
                }
                Ok(d)
            };
            let input_per_mtok = parse("input_per_mtok", &p.input_per_mtok)?;
            Price {
                input_per_mtok,
                output_per_mtok: parse("output_per_mtok", &p.output_per_mtok)?,
                cached_input_per_mtok: match &p.cached_input_per_mtok {
                    Some(v) => parse("cached_input_per_mtok", v)?,
                    None => input_per_mtok,
                },
            }
        }
    };
    Ok(ModelConfig {
        id: id.to_string(),
        source,
        backend,
        context_length: m.context_length,
        owned_by: m.owned_by.unwrap_or_else(|| "tollgate".into()),
        price,
        max_sequences_per_customer: match m.max_sequences_per_customer {
            Some(0) => return Err(err("max_sequences_per_customer must be at least 1".into())),
            other => other,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [server]
        max_n = 4
        [models."smollm2-135m"]
        source = { path = "models/x.gguf" }
        backend = { type = "local", weights = "q8_0" }
        price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }
        [models.remote]
        source = { hf_repo = "org/repo", file = "m.gguf" }
        backend = { type = "http", urls = ["http://w1:8081"] }
    "#;

    #[test]
    fn parses_and_fills_defaults() {
        let c = Config::from_toml_str(GOOD, Path::new("/etc/tollgate")).unwrap();
        assert_eq!(c.server.max_n, 4);
        let m = &c.models["smollm2-135m"];
        assert_eq!(
            m.source,
            Some(ModelSource::Path("/etc/tollgate/models/x.gguf".into()))
        );
        let BackendConfig::Local(local) = &m.backend else {
            panic!("local")
        };
        assert_eq!(local.device, "cpu");
        assert_eq!(local.weights, "q8_0");
        assert_eq!(m.price.input_per_mtok, Decimal::from_str("0.05").unwrap());
        // No cached price: cached prompt tokens cost the input price.
        assert_eq!(m.price.cached_input_per_mtok, m.price.input_per_mtok);
        let r = &c.models["remote"];
        assert_eq!(
            r.source,
            Some(ModelSource::Hub {
                repo: "org/repo".into(),
                revision: "main".into(),
                file: Some("m.gguf".into())
            })
        );
    }

    #[test]
    fn cached_input_price_is_optional_exact_and_checked() {
        let with = GOOD.replace(
            "output_per_mtok = \"0.10\" }",
            "output_per_mtok = \"0.10\", cached_input_per_mtok = \"0.0125\" }",
        );
        let c = Config::from_toml_str(&with, Path::new(".")).unwrap();
        let p = c.models["smollm2-135m"].price;
        assert_eq!(
            p.cached_input_per_mtok,
            Decimal::from_str("0.0125").unwrap()
        );
        assert_eq!(p.input_per_mtok, Decimal::from_str("0.05").unwrap());
        let negative = with.replace("\"0.0125\"", "\"-1\"");
        let e = Config::from_toml_str(&negative, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("price.cached_input_per_mtok `-1` is negative"),
            "{e}"
        );
    }

    #[test]
    fn kv_cache_dtype_is_typed_at_validation() {
        let half = GOOD.replace(
            "weights = \"q8_0\"",
            "weights = \"q8_0\", kv_cache_dtype = \"f16\"",
        );
        let c = Config::from_toml_str(&half, Path::new(".")).unwrap();
        let BackendConfig::Local(local) = &c.models["smollm2-135m"].backend else {
            panic!("local backend expected");
        };
        assert_eq!(local.kv_cache_dtype, Some(KvCacheDtype::F16));
        let bad = GOOD.replace(
            "weights = \"q8_0\"",
            "weights = \"q8_0\", kv_cache_dtype = \"int4\"",
        );
        let e = Config::from_toml_str(&bad, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("int4"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let bad = GOOD.replace("max_n = 4", "max_m = 4");
        let e = Config::from_toml_str(&bad, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_m"), "{e}");
        let bad = GOOD.replace("weights = \"q8_0\"", "wieghts = \"q8_0\"");
        let e = Config::from_toml_str(&bad, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("wieghts"), "{e}");
    }

    #[test]
    fn only_http_backends_may_leave_out_the_source() {
        let http = r#"
            [models.remote]
            backend = { type = "http", urls = ["http://w1:8081"] }
        "#;
        let c = Config::from_toml_str(http, Path::new("/")).unwrap();
        assert_eq!(c.models["remote"].source, None);
        let local = r#"
            [models.here]
            backend = { type = "local" }
        "#;
        let e = Config::from_toml_str(local, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("here") && e.contains("source is missing"), "{e}");
    }

    #[test]
    fn http_discovery_is_static_unless_dns() {
        let discovery = |extra: &str| {
            let toml = format!(
                "[models.remote]\nbackend = {{ type = \"http\", urls = [\"http://w:8081\"]{extra} }}"
            );
            Config::from_toml_str(&toml, Path::new("/")).map(|c| {
                match &c.models["remote"].backend {
                    BackendConfig::Http(h) => h.discover,
                    BackendConfig::Local(_) => unreachable!(),
                }
            })
        };
        use crate::backend::upstream::Discovery;
        assert_eq!(discovery("").unwrap(), Discovery::Static);
        assert_eq!(
            discovery(", discover = \"static\"").unwrap(),
            Discovery::Static
        );
        assert_eq!(discovery(", discover = \"dns\"").unwrap(), Discovery::Dns);
        let e = discovery(", discover = \"consul\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("remote") && e.contains("`consul`"), "{e}");
    }

    #[test]
    fn http_responses_are_translated_unless_passed_through() {
        let mode = |extra: &str| {
            let toml = format!(
                "[models.remote]\nbackend = {{ type = \"http\", urls = [\"http://w:8081\"]{extra} }}"
            );
            Config::from_toml_str(&toml, Path::new("/")).map(|c| {
                match &c.models["remote"].backend {
                    BackendConfig::Http(h) => h.responses,
                    BackendConfig::Local(_) => unreachable!(),
                }
            })
        };
        assert_eq!(mode("").unwrap(), ResponsesMode::Translate);
        assert_eq!(
            mode(", responses = \"passthrough\"").unwrap(),
            ResponsesMode::Passthrough
        );
        let e = mode(", responses = \"native\"").unwrap_err().to_string();
        assert!(e.contains("remote") && e.contains("`native`"), "{e}");
    }

    #[test]
    fn rejects_float_prices_and_bad_sources() {
        let bad = GOOD.replace("\"0.05\"", "0.05");
        assert!(Config::from_toml_str(&bad, Path::new(".")).is_err());
        let bad = GOOD.replace("\"0.05\"", "\"cheap\"");
        let e = Config::from_toml_str(&bad, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("smollm2-135m") && e.contains("cheap"), "{e}");
        let bad = GOOD.replace("source = { path = \"models/x.gguf\" }", "source = { }");
        let e = Config::from_toml_str(&bad, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs `path` or `hf_repo`"), "{e}");
        assert!(matches!(
            Config::from_toml_str("", Path::new(".")),
            Err(ConfigError::NoModels)
        ));
    }

    #[test]
    fn the_repo_catalogue_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models.toml");
        let c = Config::load(&path).unwrap();
        assert!(c.models.contains_key("smollm2-135m"));
    }
}
