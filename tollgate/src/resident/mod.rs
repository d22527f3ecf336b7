//! Local models loaded on demand within `[server] model_memory_bytes`: each local model of
//! the catalogue is a [`ResidentBackend`] whose engine loads on its first request (pinned
//! models, and at start those that fit, load before the server answers), and is unloaded when
//! the budget needs its room ([`budget`]'s policy), when it stays idle past `keep_alive_secs`,
//! or when a reload takes it out of the catalogue.
//!
//! A request holds a [`Lease`] on the engine from `prepare` until its stream ends, so a model
//! being unloaded finishes its requests first. Requests for a model that is loading wait for
//! it, at most `max_queue` of them; beyond, 503 `model_loading` with `Retry-After`.

pub mod budget;
pub mod reclaim;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Notify;
use tollgate_gateway::backend::{
    AdapterRef, Backend, BackendError, GenerateRequest, LoadReport, ModelInfo, Prepared, Residency,
    ResidencyState,
};
use tollgate_gateway::config::{LocalBackendConfig, ModelConfig, ModelSource};

use self::budget::{Budget, Plan, SlotId};
use crate::local::LocalBackend;

/// `Retry-After` of a request refused because its model's queue of waiting requests is full.
const LOADING_RETRY_AFTER_SECS: u64 = 2;
/// How often idle models are checked against their `keep_alive_secs`.
const KEEP_ALIVE_SWEEP: Duration = Duration::from_secs(1);

/// Loads one model's engine (blocking: reads the weights). Supplied by the caller so tests and
/// the binary share the policy.
pub type Loader =
    Arc<dyn Fn(&ModelConfig, &LocalBackendConfig) -> anyhow::Result<LocalBackend> + Send + Sync>;

/// The budget and the engines in memory.
pub struct Residents {
    /// A `std` lock: every section is bookkeeping and never crosses an `.await`.
    inner: Mutex<Inner>,
    /// Woken at every change a waiting request may care about (a load done, an unload).
    changed: Notify,
    loader: Loader,
}

struct Inner {
    budget: Budget,
    engines: HashMap<SlotId, Arc<LocalBackend>>,
    /// The last failed load's error, and how many failed, per slot.
    failures: HashMap<SlotId, (u64, String)>,
    /// The slot each model id has in the catalogue in force.
    by_model: HashMap<String, SlotId>,
}

impl Residents {
    /// A budget of `capacity` bytes; unloads idle models past their `keep_alive_secs` until
    /// the last handle is gone.
    pub fn start(capacity: u64, loader: Loader) -> Arc<Self> {
        let residents = Arc::new(Self {
            inner: Mutex::new(Inner {
                budget: Budget::new(capacity),
                engines: HashMap::new(),
                failures: HashMap::new(),
                by_model: HashMap::new(),
            }),
            changed: Notify::new(),
            loader,
        });
        let weak = Arc::downgrade(&residents);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEP_ALIVE_SWEEP);
            loop {
                tick.tick().await;
                let Some(residents) = weak.upgrade() else {
                    return;
                };
                residents.sweep(Instant::now());
            }
        });
        residents
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Bookkeeping never panics while holding the lock; a poisoned one is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> u64 {
        self.lock().budget.capacity()
    }

    /// A model of the catalogue, unloaded; `load_now` loads it before returning (pinned
    /// models always, others when they fit beside what is loaded).
    pub async fn add(
        self: &Arc<Self>,
        model: &ModelConfig,
        local: &LocalBackendConfig,
        info: ModelInfo,
        start: bool,
    ) -> anyhow::Result<Arc<ResidentBackend>> {
        let size = weights_bytes(model.source.as_ref()).saturating_add(local.kv_cache_bytes as u64);
        let slot = {
            let mut inner = self.lock();
            let slot = inner.budget.add(
                &model.id,
                size,
                model.pinned,
                model.keep_alive,
                Instant::now(),
            );
            inner.by_model.insert(model.id.clone(), slot);
            slot
        };
        let backend = Arc::new(ResidentBackend {
            slot,
            residents: self.clone(),
            info,
            config: (model.clone(), local.clone()),
        });
        let load_now = {
            let mut inner = self.lock();
            let now = model.pinned || (start && inner.budget.fits(slot));
            if now {
                inner.budget.start_loading(slot);
            }
            now
        };
        if load_now {
            self.load(slot, model.clone(), local.clone()).await;
            if let Some((_, error)) = self.lock().failures.get(&slot) {
                anyhow::bail!("{error}");
            }
        }
        Ok(backend)
    }

    /// Loads `slot` (marked loading) and records the outcome.
    async fn load(self: &Arc<Self>, slot: SlotId, model: ModelConfig, local: LocalBackendConfig) {
        let loader = self.loader.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || loader(&model, &local))
            .await
            .map_err(|e| anyhow::anyhow!("model loading task failed: {e}"))
            .and_then(|r| r);
        let seconds = started.elapsed().as_secs_f64();
        let dropped = {
            let mut inner = self.lock();
            let mut dropped = Vec::new();
            match result {
                Ok(engine) => {
                    inner.budget.loaded(slot, Some(seconds), Instant::now());
                    inner.engines.insert(slot, Arc::new(engine));
                    inner.failures.remove(&slot);
                    // Taken out of the catalogue while it loaded.
                    if inner.budget.slot(slot).is_some_and(|s| s.retired)
                        && inner.budget.retire(slot)
                    {
                        dropped.extend(inner.engines.remove(&slot));
                    }
                }
                Err(e) => {
                    tracing::error!(slot, "cannot load a model: {e:#}");
                    inner.budget.loaded(slot, None, Instant::now());
                    let entry = inner.failures.entry(slot).or_insert((0, String::new()));
                    entry.0 += 1;
                    entry.1 = format!("{e:#}");
                }
            }
            dropped
        };
        reclaim::give_back(dropped);
        self.changed.notify_waiters();
    }

    /// A lease on `slot`'s engine, loading it first (and waiting for room) when needed.
    async fn acquire(
        self: &Arc<Self>,
        slot: SlotId,
        config: &(ModelConfig, LocalBackendConfig),
    ) -> Result<Lease, BackendError> {
        let mut waiter: Option<Waiter> = None;
        loop {
            // Enabled before the state is read, so a change after the read wakes it.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.step(slot, config.1.max_queue, &mut waiter)? {
                Step::Leased(lease) => return Ok(lease),
                Step::Load => {
                    // On a task of its own: a request that goes away while the model loads
                    // does not leave it half loaded.
                    let (this, model, local) = (self.clone(), config.0.clone(), config.1.clone());
                    tokio::spawn(async move { this.load(slot, model, local).await });
                    notified.await;
                }
                Step::Wait => notified.await,
            }
        }
    }

    /// One look at `slot` for a request (`waiter` once it waits): a lease when loaded, else
    /// the request waits (refused when `max_queue` wait already) and, first in line, plans a
    /// load.
    fn step(
        self: &Arc<Self>,
        slot: SlotId,
        max_queue: usize,
        waiter: &mut Option<Waiter>,
    ) -> Result<Step, BackendError> {
        let mut inner = self.lock();
        if inner.budget.lease(slot, Instant::now()) {
            if let Some(engine) = inner.engines.get(&slot).cloned() {
                return Ok(Step::Leased(Lease {
                    residents: self.clone(),
                    slot,
                    engine,
                }));
            }
        }
        let gone = || BackendError::Unavailable("the model left the catalogue".into());
        let s = inner.budget.slot(slot).ok_or_else(gone)?;
        if s.retired {
            return Err(gone());
        }
        let (waiting, unloaded) = (s.waiting, s.state == ResidencyState::Unloaded);
        let failures = inner.failures.get(&slot).cloned().unwrap_or_default();
        match waiter {
            None if waiting >= max_queue as u64 => {
                return Err(BackendError::Loading {
                    retry_after_secs: LOADING_RETRY_AFTER_SECS,
                })
            }
            None => {
                if let Some(s) = inner.budget.slot_mut(slot) {
                    s.waiting += 1;
                }
                *waiter = Some(Waiter {
                    residents: self.clone(),
                    slot,
                    failures: failures.0,
                });
            }
            Some(w) if w.failures != failures.0 => {
                return Err(BackendError::Internal(format!(
                    "the model failed to load: {}",
                    failures.1
                )))
            }
            Some(_) => {}
        }
        if !unloaded {
            return Ok(Step::Wait);
        }
        inner.budget.want(slot);
        let (unload, step) = match inner.budget.plan(slot) {
            Plan::Load { unload } => (unload, Step::Load),
            Plan::Wait { unload } => (unload, Step::Wait),
        };
        let engines: Vec<Arc<LocalBackend>> = unload
            .iter()
            .filter_map(|id| inner.engines.remove(id))
            .collect();
        drop(inner);
        // Let go of outside the lock (each engine's thread ends once its work is done).
        reclaim::give_back(engines);
        Ok(step)
    }

    /// A reload kept `model`'s serving but may have changed whether it is pinned and its
    /// keep-alive.
    pub fn configure(&self, model: &ModelConfig) {
        let mut inner = self.lock();
        let Some(slot) = inner.by_model.get(&model.id).copied() else {
            return;
        };
        if let Some(s) = inner.budget.slot_mut(slot) {
            s.pinned = model.pinned;
            s.keep_alive = model.keep_alive;
        }
    }

    /// Unloads idle models past their keep-alive.
    fn sweep(&self, now: Instant) {
        let dropped: Vec<Arc<LocalBackend>> = {
            let mut inner = self.lock();
            let expired = inner.budget.expired(now);
            expired
                .iter()
                .filter_map(|id| inner.engines.remove(id))
                .collect()
        };
        if !dropped.is_empty() {
            tracing::info!(
                models = dropped.len(),
                "unloaded models idle past their keep_alive_secs"
            );
            reclaim::give_back(dropped);
            self.changed.notify_waiters();
        }
    }

    fn release(&self, slot: SlotId) {
        let dropped = {
            let mut inner = self.lock();
            if inner.budget.release(slot, Instant::now()) {
                inner.engines.remove(&slot)
            } else {
                None
            }
        };
        reclaim::give_back(dropped);
        self.changed.notify_waiters();
    }

    fn retire(&self, slot: SlotId) {
        let dropped = {
            let mut inner = self.lock();
            inner.by_model.retain(|_, s| *s != slot);
            if inner.budget.retire(slot) {
                inner.engines.remove(&slot)
            } else {
                None
            }
        };
        reclaim::give_back(dropped);
        self.changed.notify_waiters();
    }

    fn residency(&self, slot: SlotId) -> Residency {
        let inner = self.lock();
        let Some(s) = inner.budget.slot(slot) else {
            return Residency::default();
        };
        Residency {
            state: s.state,
            pinned: s.pinned,
            memory_bytes: s.size,
            load_seconds: s.recent_load_seconds.last().copied(),
            loads_total: s.loads_total,
            unloads_total: s.unloads_total,
            recent_load_seconds: s.recent_load_seconds.clone(),
            in_use: s.leases,
        }
    }
}

/// What a request does next for its lease.
enum Step {
    Leased(Lease),
    Load,
    Wait,
}

/// A request waiting for its model to load: counted against `max_queue` until it leaves.
struct Waiter {
    residents: Arc<Residents>,
    slot: SlotId,
    failures: u64,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut inner = self.residents.lock();
        if let Some(s) = inner.budget.slot_mut(self.slot) {
            s.waiting = s.waiting.saturating_sub(1);
            if s.waiting == 0 && s.state == ResidencyState::Unloaded {
                inner.budget.unwant(self.slot);
            }
        }
    }
}

/// A request's hold on a loaded engine: the model is not unloaded while one is held.
pub struct Lease {
    residents: Arc<Residents>,
    slot: SlotId,
    engine: Arc<LocalBackend>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.residents.release(self.slot);
    }
}

/// A local model of the catalogue, loaded on demand.
pub struct ResidentBackend {
    slot: SlotId,
    residents: Arc<Residents>,
    info: ModelInfo,
    /// What it loads from.
    config: (ModelConfig, LocalBackendConfig),
}

impl Drop for ResidentBackend {
    /// The catalogue (and every request) let go of it: it unloads once idle.
    fn drop(&mut self) {
        self.residents.retire(self.slot);
    }
}

#[async_trait::async_trait]
impl Backend for ResidentBackend {
    /// The engine's own (its context as loaded) while loaded, else what the catalogue says.
    fn info(&self) -> ModelInfo {
        let engine = self.residents.lock().engines.get(&self.slot).cloned();
        engine.map_or_else(
            || self.info.clone(),
            |e| ModelInfo {
                created: self.info.created,
                ..e.info()
            },
        )
    }

    async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, BackendError> {
        let lease = self.residents.acquire(self.slot, &self.config).await?;
        let prepared = lease.engine.prepare(request).await?;
        let start = prepared.start;
        Ok(Prepared {
            start: Box::new(move || {
                let events = start()?;
                // The lease lives as long as the stream: the engine stays until it ends.
                Ok(Box::pin(events.map(move |e| {
                    let _held = &lease;
                    e
                })))
            }),
            ..prepared
        })
    }

    fn load(&self) -> LoadReport {
        let engine = self.residents.lock().engines.get(&self.slot).cloned();
        engine.map(|e| e.load()).unwrap_or_default()
    }

    /// The loaded engine's (none while unloaded: they went with it).
    fn loaded_adapters(&self) -> Vec<AdapterRef> {
        let engine = self.residents.lock().engines.get(&self.slot).cloned();
        engine.map(|e| e.loaded_adapters()).unwrap_or_default()
    }

    fn residency(&self) -> Option<Residency> {
        Some(self.residents.residency(self.slot))
    }
}

/// The bytes of a model's weights on disk: a GGUF file's size, or a safetensors directory's
/// files; 0 for a Hugging Face source (not known before it is downloaded).
pub fn weights_bytes(source: Option<&ModelSource>) -> u64 {
    let Some(ModelSource::Path(path)) = source else {
        return 0;
    };
    file_or_dir_bytes(path)
}

fn file_or_dir_bytes(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0),
        _ => 0,
    }
}

/// `[server] model_memory_bytes` when unset: the memory available now (`MemAvailable` of
/// /proc/meminfo, else `MemTotal`) less a tenth of it, read before any model loads; no
/// limit where /proc/meminfo cannot be read.
pub fn default_budget() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return u64::MAX;
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kb| kb.saturating_mul(1024))
    };
    match field("MemAvailable:").or_else(|| field("MemTotal:")) {
        Some(bytes) => bytes - bytes / 10,
        None => u64::MAX,
    }
}
