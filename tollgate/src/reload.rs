//! Reading models.toml again in a running server (`SIGHUP`, `POST /admin/v1/models/reload`):
//! the next catalogue keeps each model whose serving did not change (its backend, loaded or
//! not, with new prices and limits), builds new backends for new and changed models, and
//! lets removed ones go (they finish their requests, then unload). An invalid file, or a
//! backend that cannot be built, leaves the catalogue in force as it was.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tollgate_gateway::backend::Backend;
use tollgate_gateway::catalogue::{Reload, ReloadError, ReloadOutcome, Snapshot};
use tollgate_gateway::config::Config;

use crate::models::build_backend;
use crate::resident::Residents;

/// Reloads from the catalogue file the server started with.
pub struct FileReload {
    pub path: PathBuf,
    pub residents: Arc<Residents>,
}

#[async_trait::async_trait]
impl Reload for FileReload {
    async fn reload(&self, old: &Snapshot) -> Result<(Snapshot, ReloadOutcome), ReloadError> {
        let config = Config::load(&self.path).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let mut outcome = ReloadOutcome::default();
        let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
        for (id, model) in &config.models {
            let kept = match (old.models.get(id), old.backends.get(id)) {
                (Some(before), Some(backend)) if before.same_serving(model) => {
                    if before != model {
                        outcome.updated.push(id.clone());
                    }
                    Some(backend.clone())
                }
                (Some(_), _) => {
                    outcome.replaced.push(id.clone());
                    None
                }
                (None, _) => {
                    outcome.added.push(id.clone());
                    None
                }
            };
            let backend = match kept {
                Some(backend) => backend,
                // Built anew; on an error the ones built so far are dropped (and leave the
                // budget) and the catalogue in force stays.
                None => build_backend(&self.residents, model, false)
                    .await
                    .map_err(|e| ReloadError::Backend(format!("{e:#}")))?,
            };
            backends.insert(id.clone(), backend);
        }
        // Kept models take their new pinning and keep-alive once the new catalogue is sure.
        for id in &outcome.updated {
            if let Some(model) = config.models.get(id) {
                self.residents.configure(model);
            }
        }
        outcome.removed = old
            .models
            .keys()
            .filter(|id| !config.models.contains_key(*id))
            .cloned()
            .collect();
        Ok((
            Snapshot {
                models: config.models,
                backends,
            },
            outcome,
        ))
    }
}
