//! Reading models.toml again in a running server (`SIGHUP`, `POST /admin/v1/models/reload`):
//! the next catalogue keeps each model whose serving did not change (its backend, loaded or
//! not, with new prices and limits), builds new backends for new and changed models, and
//! lets removed ones go (they finish their requests, then unload). An invalid file, or a
//! backend that cannot be built, leaves the catalogue in force as it was.
//!
//! A `tollgate worker` reloads the same way, narrowed to the one model it serves
//! ([`WorkerModel`]): a file without that model is refused (the worker keeps serving it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tollgate_gateway::backend::Backend;
use tollgate_gateway::catalogue::{Reload, ReloadError, ReloadOutcome, Snapshot};
use tollgate_gateway::config::{BackendConfig, Config, DeviceSpec};

use crate::models::build_backend;
use crate::resident::Residents;

/// Reloads from the catalogue file the server started with.
pub struct FileReload {
    pub path: PathBuf,
    pub residents: Arc<Residents>,
    /// A worker's model: the file's catalogue narrowed to it.
    pub worker: Option<WorkerModel>,
}

/// The model a `tollgate worker` serves, and the device it was told to use.
#[derive(Debug, Clone)]
pub struct WorkerModel {
    pub model: String,
    pub device: Option<DeviceSpec>,
}

impl WorkerModel {
    /// `config` with this model and its LoRA adapters only (on the device given on the
    /// command line, if any): gateways name the adapters, which its engine loads on demand.
    /// Errors name the model: it is not in the file, or it is not a local model.
    pub fn narrow(&self, mut config: Config) -> anyhow::Result<Config> {
        let model = &self.model;
        let Some(mut entry) = config.models.remove(model) else {
            let known: Vec<&String> = config.models.keys().collect();
            anyhow::bail!("no model `{model}` in the catalogue (it has {known:?})");
        };
        if let Some(adapter) = &entry.adapter {
            anyhow::bail!(
                "model `{model}` is a LoRA adapter of `{}`: a worker serves a base model (and loads its adapters on demand)",
                adapter.base
            );
        }
        match &mut entry.backend {
            BackendConfig::Local(local) => {
                if let Some(d) = self.device {
                    local.device = d;
                }
            }
            BackendConfig::Http(_) => {
                anyhow::bail!("model `{model}` is an http backend; a worker serves a local model")
            }
        }
        let adapters: Vec<_> = std::mem::take(&mut config.models)
            .into_iter()
            .filter(|(_, m)| m.adapter.as_ref().is_some_and(|a| a.base == *model))
            .collect();
        config.models = std::iter::once((model.clone(), entry))
            .chain(adapters)
            .collect();
        Ok(config)
    }
}

#[async_trait::async_trait]
impl Reload for FileReload {
    async fn reload(&self, old: &Snapshot) -> Result<(Snapshot, ReloadOutcome), ReloadError> {
        let mut config =
            Config::load(&self.path).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        if let Some(worker) = &self.worker {
            config = worker
                .narrow(config)
                .map_err(|e| ReloadError::Invalid(format!("{e:#}")))?;
        }
        let mut outcome = ReloadOutcome::default();
        let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
        for (id, model) in &config.models {
            // An adapter stays on its base model's backend only while that one is kept (a
            // base sorts before its adapters, `<base>:<name>`, so it is decided first).
            let base_rebuilt = model.adapter.as_ref().is_some_and(|a| {
                outcome.added.contains(&a.base) || outcome.replaced.contains(&a.base)
            });
            let kept = match (old.models.get(id), old.backends.get(id)) {
                (Some(before), Some(backend)) if before.same_serving(model) && !base_rebuilt => {
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
                None => build_backend(&self.residents, model, false, &backends)
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

/// `SIGHUP`s as they come. Listened for from the start of `serve` and `worker`, before the
/// models load: a hangup nobody listens for ends the process (its default action), so one
/// sent while the models load is kept and reloads once they have.
#[cfg(unix)]
pub type Hangups = tokio::signal::unix::Signal;
#[cfg(not(unix))]
pub type Hangups = ();

/// Starts listening for `SIGHUP` (`None`, logged, where it cannot be).
pub fn listen_for_hangups() -> Option<Hangups> {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP: {e}");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Reloads the catalogue at each of `hangups` until shutdown (an invalid file is logged and
/// the catalogue in force stays; so is a server without a file to reload from).
pub fn reload_on_sighup(state: &tollgate_gateway::AppState, hangups: Option<Hangups>) {
    #[cfg(unix)]
    {
        let Some(mut hangups) = hangups else {
            return;
        };
        let (state, stop) = (state.clone(), state.background.stop.clone());
        state.background.tasks.clone().spawn(async move {
            let actor = tollgate_metering::audit::Actor {
                name: "SIGHUP".into(),
                ..tollgate_metering::audit::Actor::system()
            };
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    got = hangups.recv() => if got.is_none() { return },
                }
                if let Err(e) = tollgate_gateway::api::admin::models::reload(&state, &actor).await {
                    tracing::error!(
                        "SIGHUP: the catalogue is not reloaded, the one in force stays: {e}"
                    );
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (state, hangups);
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[models."a"]
source = { path = "a.gguf" }
backend = { type = "local", device = "cpu" }

[models."b"]
source = { path = "b.gguf" }
backend = { type = "local" }

[models."up"]
backend = { type = "http", urls = ["http://127.0.0.1:9"] }
"#;

    fn config() -> Config {
        Config::from_toml_str(FILE, std::path::Path::new(".")).unwrap()
    }

    fn worker(model: &str, device: Option<DeviceSpec>) -> WorkerModel {
        WorkerModel {
            model: model.into(),
            device,
        }
    }

    #[test]
    fn a_worker_keeps_its_model_only_on_its_device() {
        let narrowed = worker("a", Some(DeviceSpec::Cuda(1)))
            .narrow(config())
            .unwrap();
        assert_eq!(narrowed.models.keys().collect::<Vec<_>>(), ["a"]);
        let BackendConfig::Local(local) = &narrowed.models["a"].backend else {
            panic!("a is local");
        };
        assert_eq!(local.device, DeviceSpec::Cuda(1));
        let kept = worker("b", None).narrow(config()).unwrap();
        let BackendConfig::Local(local) = &kept.models["b"].backend else {
            panic!("b is local");
        };
        assert_eq!(
            local.device,
            DeviceSpec::Cpu,
            "the file's device without --device"
        );
    }

    #[test]
    fn a_file_without_the_workers_local_model_is_refused_naming_it() {
        let missing = worker("gone", None).narrow(config()).unwrap_err();
        assert!(missing.to_string().contains("no model `gone`"), "{missing}");
        let http = worker("up", None).narrow(config()).unwrap_err();
        assert!(
            http.to_string().contains("`up` is an http backend"),
            "{http}"
        );
    }
}
