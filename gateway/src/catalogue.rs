//! The live catalogue: which models the gateway serves, at what price, through which
//! backend. Handlers read one [`Snapshot`] per use; a reload (`SIGHUP` or
//! `POST /admin/v1/models/reload`) replaces it whole, so a request admitted after the reload
//! sees the new models and prices and one admitted before keeps the backend it holds.
//!
//! Owns the snapshot and the [`Reload`] seam; it does not build backends (the binary does, it
//! has the runtime) nor decide which local models are loaded (the binary's residency).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::backend::Backend;
use crate::config::ModelConfig;

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
