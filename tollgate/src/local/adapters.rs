//! The LoRA adapters resident beside one local engine: read from their PEFT files on first use
//! (on the blocking pool), kept for the next requests, the least recently used let go beyond
//! [`MAX_LORAS`]. A sequence holds its adapter for as long as it runs, so letting go of one
//! never affects a request in flight. An adapter is kept with the size and modification time
//! of its two files: other files in the same directory (a customer's adapter removed and
//! registered again) are read anew, never served from the copy held. What is held is listed
//! for the server's `/health` (a worker's gateways prefer it for those adapters' requests).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tollgate_gateway::backend::{AdapterRef, BackendError};
use tollgate_runtime::model::{AdapterBase, LoraAdapter};

/// Adapters kept loaded per engine (vLLM's and the issue's `max_loras` default).
pub const MAX_LORAS: usize = 64;

/// Size and modification time of an adapter's `adapter_config.json` and
/// `adapter_model.safetensors` (`None`: one cannot be read).
type Stamp = Option<[(u64, SystemTime); 2]>;

fn stamp(dir: &Path) -> Stamp {
    let one = |file: &Path| {
        let m = std::fs::metadata(file).ok()?;
        Some((m.len(), m.modified().ok()?))
    };
    if dir.is_file() {
        // A GGUF LoRA adapter: one file.
        return one(dir).map(|s| [s, s]);
    }
    Some([
        one(&dir.join("adapter_config.json"))?,
        one(&dir.join("adapter_model.safetensors"))?,
    ])
}

/// A loaded adapter, the stamp of the files it was read from, and when it was last used.
type Entry = (Arc<LoraAdapter>, Stamp, Instant);

/// The adapters of one engine's model.
pub struct Adapters {
    base: AdapterBase,
    /// By directory. A `std` lock: held for map bookkeeping only, never while an adapter
    /// loads nor across an `.await`.
    loaded: Mutex<HashMap<PathBuf, Entry>>,
}

impl Adapters {
    pub fn new(base: AdapterBase) -> Self {
        Self {
            base,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The adapter `r` names, loaded on first use. Files that cannot be applied to the base
    /// model are [`BackendError::Adapter`]: a server error on a request, logged with its cause;
    /// the admin API's 400 when a customer's adapter is registered.
    pub async fn get(&self, r: &AdapterRef) -> Result<Arc<LoraAdapter>, BackendError> {
        let Some(dir) = &r.path else {
            // Only an adapter on a pool of workers is named without files (the workers
            // resolve it to their own before it reaches an engine).
            return Err(BackendError::Adapter(format!(
                "LoRA adapter `{}` names no files",
                r.name
            )));
        };
        // Two `stat`s: cheap enough for the async thread.
        let files = stamp(dir);
        let hit = self
            .lock()
            .get_mut(dir)
            .filter(|(_, held, _)| files.is_some() && *held == files)
            .map(|(adapter, _, used)| {
                *used = Instant::now();
                adapter.clone()
            });
        if let Some(adapter) = hit {
            return Ok(adapter);
        }
        let (name, path) = (r.name.clone(), dir.clone());
        let base = self.base.clone();
        let started = Instant::now();
        let adapter = tokio::task::spawn_blocking(move || base.load(&name, &path))
            .await
            .map_err(|e| BackendError::Internal(format!("adapter loading task failed: {e}")))?
            .map_err(|e| {
                tracing::error!(adapter = %r.name, "cannot load a LoRA adapter: {e}");
                BackendError::Adapter(format!("LoRA adapter `{}` cannot be loaded: {e}", r.name))
            })?;
        tracing::info!(
            adapter = %r.name,
            rank = adapter.rank(),
            bytes = adapter.bytes(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "LoRA adapter loaded"
        );
        let adapter = Arc::new(adapter);
        let mut loaded = self.lock();
        if loaded.len() >= MAX_LORAS && !loaded.contains_key(dir) {
            let oldest = loaded
                .iter()
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(p, _)| p.clone());
            if let Some(p) = oldest {
                loaded.remove(&p);
            }
        }
        // Two first requests may both load the same files: the first one kept wins, so every
        // later request shares one adapter (and its prefix-cache entries). Other files
        // replace what was kept.
        let entry = loaded
            .entry(dir.clone())
            .and_modify(|held| {
                if held.1 != files {
                    *held = (adapter.clone(), files, Instant::now());
                }
            })
            .or_insert((adapter, files, Instant::now()));
        Ok(entry.0.clone())
    }

    /// The adapters held now: each one's name (as first loaded) and directory.
    pub fn loaded(&self) -> Vec<AdapterRef> {
        self.lock()
            .iter()
            .map(|(dir, (adapter, _, _))| AdapterRef {
                name: adapter.name().to_string(),
                path: Some(dir.clone()),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Entry>> {
        // Map bookkeeping never panics while holding the lock.
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }
}
