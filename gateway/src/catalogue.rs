//! The live catalogue: which models the gateway serves, at what price, through which
//! backend. Handlers read one [`Snapshot`] per use; a reload (`SIGHUP` or
//! `POST /admin/v1/models/reload`) replaces it whole, so a request admitted after the reload
//! sees the new models and prices and one admitted before keeps the backend it holds.
//!
//! Beside the file's models it holds the customers' LoRA adapters (the ledger's
//! `customer_adapters`, read again every few seconds and after each change made here): each
//! is the model id `<base>:<name>` for its owner's requests only, served by its base model's
//! backend at its own prices (a price table validated as a model's, sold at the base model's
//! tiers) or the base model's. A price changed in the ledger applies to requests resolved
//! after this process has read it again. To anyone else the id does not exist.
//!
//! Owns the snapshot and the [`Reload`] seam; it does not build backends (the binary does, it
//! has the runtime) nor decide which local models are loaded (the binary's residency).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::backend::{AdapterBackend, AdapterRef, Backend, ModelInfo};
use crate::config::{adapter_model, adapter_prices, check_adapter_base, ModelConfig};
use tollgate_metering::accounts::CustomerAdapter;

/// The catalogue at one moment: each model's configuration and its backend.
pub struct Snapshot {
    pub models: BTreeMap<String, ModelConfig>,
    pub backends: HashMap<String, Arc<dyn Backend>>,
}

/// The catalogue in force, replaced whole by a reload.
#[derive(Clone)]
pub struct Catalogue {
    /// A `std` lock: held only to clone or swap the `Arc`, never across an `.await`.
    current: Arc<RwLock<Arc<Snapshot>>>,
    /// Serializes reloads (two at once would diff against the same old catalogue).
    reloading: Arc<tokio::sync::Mutex<()>>,
    reloader: Option<Arc<dyn Reload>>,
    /// The customers' adapters. A `std` lock: held only to clone or swap the `Arc`.
    owned: Arc<RwLock<Arc<OwnedAdapters>>>,
}

/// Customers' adapters: by customer, then by model id (`<base>:<name>`).
#[derive(Debug, Default)]
pub struct OwnedAdapters(HashMap<String, BTreeMap<String, CustomerAdapter>>);

impl OwnedAdapters {
    pub fn new(all: Vec<CustomerAdapter>) -> Self {
        let mut by_customer: HashMap<String, BTreeMap<String, CustomerAdapter>> = HashMap::new();
        for a in all {
            by_customer
                .entry(a.customer_id.clone())
                .or_default()
                .insert(a.model_id(), a);
        }
        Self(by_customer)
    }
}

/// A model id as one customer's request sees it: its configuration (`None` only for a
/// backend given without one, as tests do) and its backend.
pub struct Served {
    pub config: Option<ModelConfig>,
    pub backend: Arc<dyn Backend>,
}

impl Catalogue {
    pub fn new(
        models: BTreeMap<String, ModelConfig>,
        backends: HashMap<String, Arc<dyn Backend>>,
    ) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(Snapshot { models, backends }))),
            reloading: Arc::default(),
            reloader: None,
            owned: Arc::default(),
        }
    }

    /// Reloads go through `reloader` (without one, [`Catalogue::reload`] refuses).
    pub fn with_reloader(mut self, reloader: Arc<dyn Reload>) -> Self {
        self.reloader = Some(reloader);
        self
    }

    /// The catalogue in force now.
    pub fn current(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            // A writer never panics while holding the lock (it only swaps an `Arc`).
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A model's backend, if the catalogue has it.
    pub fn backend(&self, model: &str) -> Option<Arc<dyn Backend>> {
        self.current().backends.get(model).cloned()
    }

    /// A model's configuration, if the catalogue has it.
    pub fn model(&self, model: &str) -> Option<ModelConfig> {
        self.current().models.get(model).cloned()
    }

    /// The customers' adapters from now on (all of them, as the ledger holds them).
    pub fn set_owned(&self, all: Vec<CustomerAdapter>) {
        let next = Arc::new(OwnedAdapters::new(all));
        match self.owned.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    fn owned(&self) -> Arc<OwnedAdapters> {
        match self.owned.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The model `id` for `customer`'s requests: a model of the catalogue (an operator's
    /// adapter among them), else one of the customer's own adapters whose base model is a
    /// model of the catalogue that runs adapters. `None` for anything else, another
    /// customer's adapters included.
    pub fn served(&self, customer: &str, id: &str) -> Option<Served> {
        let snapshot = self.current();
        if let Some(backend) = snapshot.backends.get(id) {
            return Some(Served {
                config: snapshot.models.get(id).cloned(),
                backend: backend.clone(),
            });
        }
        let owned = self.owned();
        let adapter = owned.0.get(customer)?.get(id)?;
        Self::owned_served(&snapshot, adapter)
    }

    /// A customer's adapter as its model id, while its base model is a model of `snapshot`
    /// that runs adapters (its own price or the base model's, the customer as owner). A price
    /// the ledger holds that no longer validates (the file's tiers changed, say) leaves the id
    /// unserved rather than billed at another price.
    fn owned_served(snapshot: &Snapshot, a: &CustomerAdapter) -> Option<Served> {
        let base = snapshot.models.get(&a.base_model)?;
        check_adapter_base(&a.base_model, Some(base)).ok()?;
        let prices = match adapter_prices(base, a.price.as_ref()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(customer = %a.customer_id, adapter = %a.model_id(),
                    "adapter not served: its price is refused: {e}");
                return None;
            }
        };
        let base_backend = snapshot.backends.get(&a.base_model)?.clone();
        let path = Some(std::path::PathBuf::from(&a.path));
        let config = adapter_model(base, &a.name, path.clone(), prices, a.customer_id.clone());
        let reference = AdapterRef {
            name: a.name.clone(),
            path,
        };
        let backend = AdapterBackend::new(
            base_backend,
            reference,
            config.id.clone(),
            a.customer_id.clone(),
        );
        Some(Served {
            config: Some(config),
            backend: Arc::new(backend),
        })
    }

    /// On a `tollgate worker`: the model `model` with the adapter a gateway named for the
    /// request: the files at its path when the gateway sent one, else this server's own adapter
    /// of that name on `model` (`[[models."<model>".adapters]]` in its models.toml). `Ok(None)`
    /// when there is no such model; `Err` says what is missing.
    pub fn forwarded(&self, model: &str, adapter: &AdapterRef) -> Result<Option<Served>, String> {
        let snapshot = self.current();
        let (Some(base), Some(base_backend)) =
            (snapshot.models.get(model), snapshot.backends.get(model))
        else {
            return Ok(None);
        };
        if base.adapter.is_some() {
            return Err(format!(
                "model `{model}` is an adapter itself; a LoRA adapter goes on its base model"
            ));
        }
        let name = &adapter.name;
        let config = match &adapter.path {
            Some(path) => adapter_model(
                base,
                name,
                Some(path.clone()),
                base.prices,
                base.owned_by.clone(),
            ),
            None => {
                let id = format!("{model}:{name}");
                return match (snapshot.models.get(&id), snapshot.backends.get(&id)) {
                    (Some(own), Some(backend)) if own.adapter.is_some() => Ok(Some(Served {
                        config: Some(own.clone()),
                        backend: backend.clone(),
                    })),
                    _ => Err(format!(
                        "this worker declares no LoRA adapter `{name}` on model `{model}` (and \
                         the gateway sent no path for it)"
                    )),
                };
            }
        };
        let backend = AdapterBackend::new(
            base_backend.clone(),
            adapter.clone(),
            config.id.clone(),
            config.owned_by.clone(),
        );
        Ok(Some(Served {
            config: Some(config),
            backend: Arc::new(backend),
        }))
    }

    /// The models `customer`'s keys see, by id: the catalogue's and the customer's own
    /// adapters (one of those whose id the catalogue also has is the catalogue's).
    pub fn models_of(&self, customer: &str) -> Vec<ModelInfo> {
        let snapshot = self.current();
        let mut out: BTreeMap<String, ModelInfo> = snapshot
            .backends
            .iter()
            .map(|(id, b)| (id.clone(), b.info()))
            .collect();
        if let Some(own) = self.owned().0.get(customer) {
            for a in own.values() {
                if let Some(s) = Self::owned_served(&snapshot, a) {
                    out.entry(a.model_id()).or_insert_with(|| s.backend.info());
                }
            }
        }
        out.into_values().collect()
    }

    fn replace(&self, next: Snapshot) {
        let next = Arc::new(next);
        match self.current.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    /// Reads the catalogue's file again and puts the result in force; on an error the
    /// catalogue in force stays as it was.
    pub async fn reload(&self) -> Result<ReloadOutcome, ReloadError> {
        let Some(reloader) = &self.reloader else {
            return Err(ReloadError::Unsupported);
        };
        let _one_at_a_time = self.reloading.lock().await;
        let old = self.current();
        let (next, outcome) = reloader.reload(&old).await?;
        self.replace(next);
        Ok(outcome)
    }
}

/// Builds the next catalogue from the file, reusing the old one's backends where a model's
/// serving did not change. Implemented by the binary.
#[async_trait::async_trait]
pub trait Reload: Send + Sync + 'static {
    async fn reload(&self, old: &Snapshot) -> Result<(Snapshot, ReloadOutcome), ReloadError>;
}

/// Why a reload was refused; the catalogue in force stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read or is not a valid catalogue.
    #[error("{0}")]
    Invalid(String),
    /// A new backend could not be built (an http model's `api_key_env` unset, say).
    #[error("{0}")]
    Backend(String),
    /// This process has no file to reload from.
    #[error("this server cannot reload its catalogue")]
    Unsupported,
}

/// What a reload changed, by model id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReloadOutcome {
    /// Models that appeared.
    pub added: Vec<String>,
    /// Models that left the catalogue (their requests in flight finish, then they unload).
    pub removed: Vec<String>,
    /// Models whose serving changed (a new backend, the old one drains).
    pub replaced: Vec<String>,
    /// Models whose price, limits, pinning or keep-alive changed (same backend): applied to
    /// requests admitted from now on.
    pub updated: Vec<String>,
}
