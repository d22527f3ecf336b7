//! The catalogue's models: where each one's files are, which backend serves it (a local
//! engine or a pool of OpenAI-compatible upstreams) and its price, validated from the raw
//! tables into types.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::Deserialize;
use tollgate_metering::kinds::ServiceTier;
use tollgate_metering::money::{Price, TierPrices};
use tollgate_metering::store::NewReservation;

use super::adapters::{AdapterConfig, RawAdapter};
use super::prices::{only_tiers, price_decimal, validate_prices, RawPrice};
use super::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    source: Option<RawSource>,
    backend: RawBackend,
    context_length: Option<u32>,
    owned_by: Option<String>,
    price: Option<RawPrice>,
    /// The classes of service the model is sold at (every one when absent).
    service_tiers: Option<Vec<ServiceTier>>,
    max_sequences_per_customer: Option<u32>,
    /// Tokens per minute the model serves saturated (measured with the bench): what its
    /// reservations may add up to. Absent: the model cannot be reserved.
    capacity_tpm: Option<u64>,
    /// Seconds a `flex` request may wait for the engine to admit it (600 when absent).
    flex_max_wait_secs: Option<u64>,
    /// A local model kept loaded whatever the memory budget (loaded at start).
    pinned: Option<bool>,
    /// A local model idle this long is unloaded (absent: only to make room).
    keep_alive_secs: Option<u64>,
    /// LoRA adapters on this model (local, or a pool of workers), each served as the model id
    /// `<id>:<name>`.
    pub(super) adapters: Option<Vec<RawAdapter>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
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
        weights: Option<WeightForm>,
        max_queue: Option<usize>,
        max_batch_tokens: Option<usize>,
        max_step_sequences: Option<usize>,
        interleave_passes: Option<usize>,
        interleave_every: Option<u64>,
        speculative_draft: Option<usize>,
        speculative_max_batch: Option<usize>,
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
        /// `least_busy` (default) or `customer`.
        routing: Option<String>,
        /// Send `service_tier` (when not `default`) to upstreams (default true); false for an
        /// upstream that refuses the field.
        forward_service_tier: Option<bool>,
        /// Send OpenAI's `prediction` to upstreams (default: `forward_customer`, true for
        /// pools of `tollgate worker`s); when false a request with one is refused.
        forward_prediction: Option<bool>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// A LoRA adapter's model id (`<base>:<name>`): the base model's engine runs it with the
    /// adapter; `None` for a model of its own.
    pub adapter: Option<AdapterConfig>,
    pub id: String,
    /// Where the weights come from; `None` only for http backends (the upstream has them).
    pub source: Option<ModelSource>,
    pub backend: BackendConfig,
    /// Limit of the context below the model's own.
    pub context_length: Option<u32>,
    pub owned_by: String,
    /// Its unit prices per class of service; a tier without one is not sold.
    pub prices: TierPrices,
    /// Sequences one customer may have in flight on this model (429 beyond).
    pub max_sequences_per_customer: Option<u32>,
    /// Reserved capacity: what the model's reservations may add up to (tokens per minute)
    /// and what 1,000 of them cost per month; `None` unless both are set.
    pub reserved: Option<ReservedCapacity>,
    /// How long a `flex` request may wait for the engine to admit it before it is refused
    /// (429 `resource_unavailable`, never billed).
    pub flex_max_wait: std::time::Duration,
    /// A local model loaded at start and never unloaded to make room (`pinned = true`).
    pub pinned: bool,
    /// A local model idle (no request using it) this long is unloaded (`keep_alive_secs`);
    /// `None`: it stays loaded until the memory budget needs its room.
    pub keep_alive: Option<std::time::Duration>,
}

impl ModelConfig {
    /// Whether `self` and `other` are served alike (same files, backend and context), so a
    /// reload from one to the other keeps the running backend; they may differ in price,
    /// tiers, limits and residency settings.
    pub fn same_serving(&self, other: &Self) -> bool {
        self.adapter == other.adapter
            && self.source == other.source
            && self.backend == other.backend
            && self.context_length == other.context_length
            && self.owned_by == other.owned_by
    }

    /// A reservation of `tpm` tokens per minute of this model for `customer_id` over
    /// `[starts_at, ends_at)`, at its reserved price, and the capacity the store checks it
    /// against; or the field at fault and why (the model is not reservable, the numbers are
    /// not). The admin API, the console and the CLI all reserve through it.
    pub fn reservation(
        &self,
        customer_id: &str,
        tpm: i64,
        starts_at: i64,
        ends_at: Option<i64>,
    ) -> Result<(NewReservation, i64), (&'static str, String)> {
        let Some(reserved) = self.reserved else {
            return Err((
                "model",
                format!(
                    "model `{}` cannot be reserved: models.toml gives it no capacity_tpm and \
                     price.reserved_per_ktpm_month",
                    self.id
                ),
            ));
        };
        if tpm <= 0 {
            return Err((
                "reserved_tokens_per_minute",
                format!("reserved_tokens_per_minute {tpm} is not a positive whole number"),
            ));
        }
        if ends_at.is_some_and(|e| e <= starts_at) {
            return Err(("ends_at", "ends_at is not after starts_at".to_string()));
        }
        let new = NewReservation {
            customer_id: customer_id.to_string(),
            model: self.id.clone(),
            reserved_tokens_per_minute: tpm,
            price_per_ktpm_month: reserved.price_per_ktpm_month,
            span: (starts_at, ends_at),
        };
        Ok((
            new,
            i64::try_from(reserved.capacity_tpm).unwrap_or(i64::MAX),
        ))
    }
}

/// A model's `capacity_tpm` and `price.reserved_per_ktpm_month`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedCapacity {
    pub capacity_tpm: u64,
    pub price_per_ktpm_month: Decimal,
}

/// `flex_max_wait_secs` when a model does not set it: what OpenAI's flex waits at most.
pub const DEFAULT_FLEX_MAX_WAIT_SECS: u64 = 600;

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

impl BackendConfig {
    /// Whether LoRA adapters can run on this backend: a local engine, or a pool of
    /// `tollgate worker`s (`forward_customer = true`), which load them on their engines. A
    /// plain OpenAI-compatible server cannot be told which adapter to apply.
    pub fn runs_adapters(&self) -> bool {
        match self {
            Self::Local(_) => true,
            Self::Http(http) => http.forward_customer,
        }
    }
}

/// What a local model's KV cache holds keys and values as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    F32,
    F16,
}

/// The device a local model runs on: `cpu`, or `cuda:N` (`cuda` alone is `cuda:0`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{other}` is not a device: use `cpu` or `cuda:N`")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The form a local model's weights take on its device (the runtime's `WeightForm`, named in
/// the catalogue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightForm {
    /// CPU: Tollgate's kernels on the file's own quantization where it can. CUDA: f16.
    #[default]
    Auto,
    /// Keep the file's own form.
    Native,
    /// Re-quantize to Q8_0.
    #[serde(rename = "q8_0", alias = "q8")]
    Q8_0,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBackendConfig {
    pub device: DeviceSpec,
    pub weights: WeightForm,
    pub max_queue: usize,
    pub max_batch_tokens: usize,
    /// Sequences one forward pass takes at most; `None`: the engine's whole batch.
    pub max_step_sequences: Option<usize>,
    /// Passes a step may run between its layers to start newcomers (0: none, newcomers join
    /// the next step); `None`: the engine's default.
    pub interleave_passes: Option<usize>,
    /// A step runs a pass for newcomers only when none of the `interleave_every - 1` steps
    /// before it did; `None`: the engine's default.
    pub interleave_every: Option<u64>,
    /// Longest draft a decoding sequence verifies in one pass (speculative decoding from the
    /// request's prediction or its own prompt and output; 0: off); `None`: the engine's default.
    pub speculative_draft: Option<usize>,
    /// Decoding sequences in a step beyond which none drafts; `None`: the engine's default.
    pub speculative_max_batch: Option<usize>,
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
    pub discover: Discovery,
    /// How `/v1/responses` reaches the upstream.
    pub responses: ResponsesMode,
    /// Whether members get each request's customer and scheduling weight (headers
    /// [`crate::backend::upstream::CUSTOMER_HEADER`] and
    /// [`crate::backend::upstream::WEIGHT_HEADER`]): for pools of `tollgate worker`s.
    pub forward_customer: bool,
    /// How a member is picked for each request.
    pub routing: Routing,
    /// Whether upstreams get the request's `service_tier` in the body (when not `default`;
    /// workers that get the customer get it as a header instead).
    pub forward_service_tier: bool,
    /// Whether upstreams get a request's `prediction` (else it is refused for the model).
    pub forward_prediction: bool,
}

/// How a pool finds its members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Discovery {
    /// The configured URLs, one member each.
    #[default]
    Static,
    /// Every address each URL's host name resolves to, resolved again every probe round.
    Dns,
}

/// How a pool picks a member for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Routing {
    /// The healthy member with the fewest requests in flight.
    #[default]
    LeastBusy,
    /// The customer's own member while it carries fewer requests than `LOAD_BOUND` times
    /// the average, or than `LOAD_FLOOR` (`backend/upstream`; requests without a customer:
    /// least busy).
    Customer,
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

pub(super) fn validate_source(source: RawSource, base_dir: &Path) -> Result<ModelSource, String> {
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

pub(super) fn validate_model(
    id: &str,
    m: RawModel,
    base_dir: &Path,
) -> Result<ModelConfig, ConfigError> {
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
    let backend = validate_backend(m.backend, base_dir).map_err(err)?;
    if matches!(backend, BackendConfig::Http(_))
        && (m.pinned.is_some() || m.keep_alive_secs.is_some())
    {
        return Err(err(
            "pinned and keep_alive_secs apply to local models (an http backend's upstream keeps its own)".into(),
        ));
    }
    let reserved_price = match m
        .price
        .as_ref()
        .and_then(|p| p.reserved_per_ktpm_month.as_ref())
    {
        Some(v) => Some(price_decimal("reserved_per_ktpm_month", v).map_err(err)?),
        None => None,
    };
    let reserved = match (m.capacity_tpm, reserved_price) {
        (Some(0), _) => return Err(err("capacity_tpm must be at least 1".into())),
        (Some(capacity_tpm), Some(price_per_ktpm_month)) => Some(ReservedCapacity {
            capacity_tpm,
            price_per_ktpm_month,
        }),
        (None, Some(_)) => return Err(err(
            "price.reserved_per_ktpm_month needs capacity_tpm (what reservations may add up to)"
                .into(),
        )),
        (_, None) => None,
    };
    let prices = match m.price {
        Some(p) => validate_prices(p).map_err(err)?,
        None => TierPrices::uniform(Price::default()),
    };
    let prices = match m.service_tiers {
        Some(tiers) => only_tiers(prices, &tiers).map_err(err)?,
        None => prices,
    };
    Ok(ModelConfig {
        adapter: None,
        id: id.to_string(),
        source,
        backend,
        context_length: m.context_length,
        owned_by: m.owned_by.unwrap_or_else(|| "tollgate".into()),
        prices,
        max_sequences_per_customer: match m.max_sequences_per_customer {
            Some(0) => return Err(err("max_sequences_per_customer must be at least 1".into())),
            other => other,
        },
        reserved,
        flex_max_wait: std::time::Duration::from_secs(
            m.flex_max_wait_secs.unwrap_or(DEFAULT_FLEX_MAX_WAIT_SECS),
        ),
        pinned: m.pinned.unwrap_or(false),
        keep_alive: m.keep_alive_secs.map(std::time::Duration::from_secs),
    })
}

/// A model's `backend` table, its defaults filled in (paths relative to `base_dir`).
fn validate_backend(backend: RawBackend, base_dir: &Path) -> Result<BackendConfig, String> {
    Ok(match backend {
        RawBackend::Local {
            device,
            weights,
            max_queue,
            max_batch_tokens,
            max_step_sequences,
            interleave_passes,
            interleave_every,
            speculative_draft,
            speculative_max_batch,
            kv_cache_bytes,
            kv_cache_dtype,
            chat_template,
        } => BackendConfig::Local(LocalBackendConfig {
            device: device
                .map(|d| d.parse())
                .transpose()
                .map_err(|e| format!("backend.device: {e}"))?
                .unwrap_or_default(),
            weights: weights.unwrap_or_default(),
            max_queue: max_queue.unwrap_or(64).max(1),
            max_batch_tokens: max_batch_tokens.unwrap_or(512).max(1),
            max_step_sequences: max_step_sequences.map(|n| n.max(1)),
            interleave_passes,
            interleave_every: interleave_every.map(|n| n.max(1)),
            speculative_draft,
            speculative_max_batch,
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
            routing,
            forward_service_tier,
            forward_prediction,
        } => {
            if urls.is_empty() {
                return Err("backend.urls is empty".into());
            }
            BackendConfig::Http(HttpBackendConfig {
                urls,
                api_key_env,
                discover: choice(
                    "discover",
                    discover,
                    &[("static", Discovery::Static), ("dns", Discovery::Dns)],
                )?,
                responses: choice(
                    "responses",
                    responses,
                    &[
                        ("translate", ResponsesMode::Translate),
                        ("passthrough", ResponsesMode::Passthrough),
                    ],
                )?,
                forward_customer: forward_customer.unwrap_or(false),
                routing: choice(
                    "routing",
                    routing,
                    &[
                        ("least_busy", Routing::LeastBusy),
                        ("customer", Routing::Customer),
                    ],
                )?,
                forward_service_tier: forward_service_tier.unwrap_or(true),
                forward_prediction: forward_prediction.unwrap_or(forward_customer.unwrap_or(false)),
            })
        }
    })
}

/// `backend.{key}`: one of `options` by name, the first when unset.
fn choice<T: Copy>(key: &str, value: Option<String>, options: &[(&str, T)]) -> Result<T, String> {
    let Some(value) = value else {
        return options
            .first()
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("backend.{key} has no choices"));
    };
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<String> = options.iter().map(|(n, _)| format!("`{n}`")).collect();
            format!("backend.{key} `{value}` is neither {}", names.join(" nor "))
        })
}
