//! The backend of a LoRA adapter's model id (`<base>:<name>`: an operator's,
//! `[[models."<base>".adapters]]`, or a customer's, `crate::catalogue`): its requests go to
//! the base model's backend with the adapter named on them, so they share the base model's
//! engine (and its slot in the memory budget) and are batched with the base model's requests
//! and other adapters'. The engine side is the binary's `local::adapters`. On a pool of
//! `tollgate worker`s the pool forwards the adapter to the worker it picks
//! (`upstream::adapters`), which loads it on its engine; the keys below say which adapters a
//! worker holds.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use tollgate_metering::secrets::{digest, hex};

use super::{
    AdapterRef, Backend, BackendError, GenerateRequest, LoadReport, ModelInfo, Prepared, Prompt,
    Residency, SamplingParams,
};

/// An adapter's model id on its base model's backend.
pub struct AdapterBackend {
    base: Arc<dyn Backend>,
    adapter: AdapterRef,
    id: String,
    owned_by: String,
}

impl AdapterBackend {
    pub fn new(base: Arc<dyn Backend>, adapter: AdapterRef, id: String, owned_by: String) -> Self {
        Self {
            base,
            adapter,
            id,
            owned_by,
        }
    }
}

#[async_trait::async_trait]
impl Backend for AdapterBackend {
    /// The base model's, under the adapter's id.
    fn info(&self) -> ModelInfo {
        ModelInfo {
            id: self.id.clone(),
            owned_by: self.owned_by.clone(),
            ..self.base.info()
        }
    }

    async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, BackendError> {
        let request = GenerateRequest {
            adapter: Some(self.adapter.clone()),
            ..request
        };
        self.base.prepare(request).await
    }

    /// The base model's engine: the adapter's requests are among its load.
    fn load(&self) -> LoadReport {
        self.base.load()
    }

    /// None: the memory and loads are the base model's, reported under its id once (the
    /// adapter is loaded whenever its base is).
    fn residency(&self) -> Option<Residency> {
        None
    }
}

/// Whether `base` can apply the adapter `adapter`: its files are read and checked against the
/// base model as a request's would be. A local model's engine does it without running
/// anything (loading the base model first when it is not resident); a pool of workers runs a
/// one-token request on one of them, which reads the files first. `Err(BackendError::Adapter)`
/// says what is wrong with the files (a worker's reason stays in its log).
pub async fn check_adapter(base: &dyn Backend, adapter: AdapterRef) -> Result<(), BackendError> {
    let probe = GenerateRequest {
        request_id: String::new(),
        model: base.info().id,
        prompt: Prompt::Text(" ".into()),
        params: SamplingParams {
            max_tokens: Some(1),
            ..SamplingParams::default()
        },
        response_format: Default::default(),
        tools: None,
        customer: None,
        scheduling_weight: None,
        service_tier: Default::default(),
        max_queue_wait: None,
        prediction: None,
        adapter: Some(adapter),
    };
    let prepared = base.prepare(probe).await?;
    if !base.reads_adapters_when_run() {
        // Prepared and never started: nothing reaches the engine's queue.
        return Ok(());
    }
    let mut events = (prepared.start)()?;
    match events.next().await {
        Some(Err(e)) => Err(e),
        // Started: the worker loaded it. Dropping the stream ends the request.
        _ => Ok(()),
    }
}

/// What a worker's `/health` lists for an adapter its engine holds, and what a gateway looks
/// for there to prefer that worker: `path:` and 16 hex digits of the SHA-256 of the adapter's
/// directory (a customer's path is not shown), or for an adapter named without files (the
/// worker's own) `name:` and its name.
pub fn adapter_key(adapter: &AdapterRef) -> String {
    match &adapter.path {
        Some(path) => format!("path:{}", &hex(&digest(&path.to_string_lossy()))[..16]),
        None => format!("name:{}", adapter.name),
    }
}

/// The keys of the adapters `loaded` on a model's engine: each one's path key, and its name
/// key too when it is the files of one of `declared` (the server's own adapters of the
/// model, by name and directory), which gateways name without files.
pub fn adapter_keys<'a>(
    loaded: &[AdapterRef],
    declared: impl Iterator<Item = (&'a str, &'a Path)> + Clone,
) -> Vec<String> {
    let mut keys = Vec::new();
    for a in loaded {
        keys.push(adapter_key(a));
        let own = declared
            .clone()
            .find(|(name, path)| *name == a.name && a.path.as_deref() == Some(*path));
        if let Some((name, _)) = own {
            keys.push(adapter_key(&AdapterRef {
                name: name.to_string(),
                path: None,
            }));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn keys_hide_paths_and_name_the_servers_own_adapters() {
        let at = |name: &str, path: &str| AdapterRef {
            name: name.into(),
            path: Some(PathBuf::from(path)),
        };
        let key = adapter_key(&at("pirate", "/srv/adapters/acme/pirate"));
        assert!(key.starts_with("path:") && key.len() == 21, "{key}");
        assert!(!key.contains("acme"));
        assert_ne!(
            key,
            adapter_key(&at("pirate", "/srv/adapters/other/pirate"))
        );
        assert_eq!(
            key,
            adapter_key(&at("renamed", "/srv/adapters/acme/pirate"))
        );
        let by_name = AdapterRef {
            name: "noisy".into(),
            path: None,
        };
        assert_eq!(adapter_key(&by_name), "name:noisy");
        // Loaded: a customer's and the server's own `noisy`; another `noisy` elsewhere is not
        // the declared one.
        let loaded = [at("pirate", "/a/pirate"), at("noisy", "/own/noisy")];
        let declared = [("noisy", Path::new("/own/noisy"))];
        let keys = adapter_keys(&loaded, declared.iter().copied());
        assert_eq!(keys.len(), 3);
        assert!(keys.contains(&"name:noisy".to_string()));
        let elsewhere = adapter_keys(&[at("noisy", "/a/noisy")], declared.iter().copied());
        assert_eq!(elsewhere, [adapter_key(&at("noisy", "/a/noisy"))]);
    }
}
