//! The memory budget's policy, with no model and no clock of its own: which local models are
//! in memory, which one loads next, and which are unloaded to make room for it.
//!
//! A model's size is what it counts against the budget: its weights file's size plus its KV
//! cache reservation (`kv_cache_bytes`), known before it loads. Models wanting a load queue
//! in the order they were first asked for; only the first of them plans a load, so two
//! models sharing the budget take turns instead of one starving the other. To make room the
//! least recently used unpinned models go first: an idle one (no request using it, none
//! waiting for it) is unloaded at once, a busy one drains (takes no new request, unloads
//! when its last request ends). A model larger than all the budget pinned models leave loads
//! once every other unpinned model is out (it then runs alone, over the budget).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use tollgate_gateway::backend::{ResidencyState, RECENT_LOADS};

/// A slot of the budget: one model as one catalogue built it (a reload that changes a
/// model's serving gives it a new slot; the old one drains).
pub type SlotId = u64;

/// One model's place in the budget.
#[derive(Debug, Clone)]
pub struct Slot {
    pub model: String,
    pub size: u64,
    pub pinned: bool,
    pub keep_alive: Option<Duration>,
    pub state: ResidencyState,
    /// Requests using the loaded model.
    pub leases: u64,
    /// Requests waiting for it to load.
    pub waiting: u64,
    pub last_used: Instant,
    /// Left the catalogue: unloads when its last request ends, then leaves the budget.
    pub retired: bool,
    pub loads_total: u64,
    pub unloads_total: u64,
    pub recent_load_seconds: Vec<f64>,
}

/// What the first model in line should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Load now, after unloading these (idle) slots.
    Load { unload: Vec<SlotId> },
    /// Wait for a change (draining slots to end, a load to finish, an earlier model in line);
    /// these idle slots are unloaded meanwhile.
    Wait { unload: Vec<SlotId> },
}

/// The budget and its slots.
#[derive(Debug)]
pub struct Budget {
    capacity: u64,
    slots: BTreeMap<SlotId, Slot>,
    /// Slots wanting a load, in the order first asked.
    line: VecDeque<SlotId>,
    next: SlotId,
}

impl Budget {
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            slots: BTreeMap::new(),
            line: VecDeque::new(),
            next: 1,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// A new slot, unloaded.
    pub fn add(
        &mut self,
        model: &str,
        size: u64,
        pinned: bool,
        keep_alive: Option<Duration>,
        now: Instant,
    ) -> SlotId {
        let id = self.next;
        self.next += 1;
        self.slots.insert(
            id,
            Slot {
                model: model.to_string(),
                size,
                pinned,
                keep_alive,
                state: ResidencyState::Unloaded,
                leases: 0,
                waiting: 0,
                last_used: now,
                retired: false,
                loads_total: 0,
                unloads_total: 0,
                recent_load_seconds: Vec::new(),
            },
        );
        id
    }

    pub fn slot(&self, id: SlotId) -> Option<&Slot> {
        self.slots.get(&id)
    }

    pub fn slot_mut(&mut self, id: SlotId) -> Option<&mut Slot> {
        self.slots.get_mut(&id)
    }

    /// What the loaded, loading and draining slots take.
    pub fn used(&self) -> u64 {
        self.slots
            .values()
            .filter(|s| s.state != ResidencyState::Unloaded)
            .map(|s| s.size)
            .sum()
    }

    /// Whether `id` fits beside what is in memory now, without unloading anything.
    pub fn fits(&self, id: SlotId) -> bool {
        self.slots
            .get(&id)
            .is_some_and(|s| self.used().saturating_add(s.size) <= self.capacity)
    }

    /// `id` wants a load: it joins the line (once).
    pub fn want(&mut self, id: SlotId) {
        if !self.line.contains(&id) {
            self.line.push_back(id);
        }
    }

    /// `id` no longer wants a load (it started loading, or nobody waits for it any more).
    pub fn unwant(&mut self, id: SlotId) {
        self.line.retain(|s| *s != id);
    }

    /// What `id` (unloaded, wanting a load) should do: see the module's rules. Slots it drains
    /// are marked so; slots it unloads are returned (their engines are dropped by the caller)
    /// and marked unloaded; a `Load` marks `id` loading and takes it out of the line.
    pub fn plan(&mut self, id: SlotId) -> Plan {
        let Some(size) = self.slots.get(&id).map(|s| s.size) else {
            return Plan::Wait { unload: Vec::new() };
        };
        if self.line.front() != Some(&id) {
            return Plan::Wait { unload: Vec::new() };
        }
        let free = self.capacity.saturating_sub(self.used());
        let mut candidates: Vec<(Instant, SlotId)> = self
            .slots
            .iter()
            .filter(|(sid, s)| {
                **sid != id && !s.pinned && s.state == ResidencyState::Loaded && s.waiting == 0
            })
            .map(|(sid, s)| (s.last_used, *sid))
            .collect();
        candidates.sort();
        let (mut unload, mut drain, mut freed) = (Vec::new(), Vec::new(), 0u64);
        for (_, sid) in candidates {
            if free.saturating_add(freed) >= size {
                break;
            }
            let Some(s) = self.slots.get(&sid) else {
                continue;
            };
            freed = freed.saturating_add(s.size);
            if s.leases == 0 {
                unload.push(sid);
            } else {
                drain.push(sid);
            }
        }
        for sid in &unload {
            self.unloaded(*sid);
        }
        for sid in &drain {
            if let Some(s) = self.slots.get_mut(sid) {
                s.state = ResidencyState::Draining;
            }
        }
        let room = free.saturating_add(freed) >= size && drain.is_empty();
        // Too large for the budget: loads once no other unpinned model is in memory.
        let alone = !self
            .slots
            .iter()
            .any(|(sid, s)| *sid != id && !s.pinned && s.state != ResidencyState::Unloaded);
        if room || alone {
            self.start_loading(id);
            Plan::Load { unload }
        } else {
            Plan::Wait { unload }
        }
    }

    /// Marks `id` loading (out of the line), whatever the budget says: for pinned models at
    /// start and for [`Budget::plan`].
    pub fn start_loading(&mut self, id: SlotId) {
        self.unwant(id);
        if let Some(s) = self.slots.get_mut(&id) {
            s.state = ResidencyState::Loading;
        }
    }

    /// `id` finished loading in `seconds` (`None`: the load failed, it is unloaded again).
    pub fn loaded(&mut self, id: SlotId, seconds: Option<f64>, now: Instant) {
        let Some(s) = self.slots.get_mut(&id) else {
            return;
        };
        match seconds {
            Some(secs) => {
                s.state = ResidencyState::Loaded;
                s.last_used = now;
                s.loads_total += 1;
                if s.recent_load_seconds.len() == RECENT_LOADS {
                    s.recent_load_seconds.remove(0);
                }
                s.recent_load_seconds.push(secs);
            }
            None => s.state = ResidencyState::Unloaded,
        }
    }

    /// A request starts using loaded `id`; false when it is not loaded (or draining).
    pub fn lease(&mut self, id: SlotId, now: Instant) -> bool {
        match self.slots.get_mut(&id) {
            Some(s) if s.state == ResidencyState::Loaded => {
                s.leases += 1;
                s.last_used = now;
                true
            }
            _ => false,
        }
    }

    /// A request stopped using `id`; true when `id` unloaded (it was draining and this was
    /// its last request).
    pub fn release(&mut self, id: SlotId, now: Instant) -> bool {
        let Some(s) = self.slots.get_mut(&id) else {
            return false;
        };
        s.leases = s.leases.saturating_sub(1);
        s.last_used = now;
        if s.leases == 0 && s.state == ResidencyState::Draining {
            self.unloaded(id);
            return true;
        }
        false
    }

    /// `id` left the catalogue: unloaded now when idle (true), else drained; it leaves the
    /// budget once unloaded.
    pub fn retire(&mut self, id: SlotId) -> bool {
        self.unwant(id);
        let Some(s) = self.slots.get_mut(&id) else {
            return false;
        };
        s.retired = true;
        match s.state {
            ResidencyState::Loaded if s.leases == 0 => {
                self.unloaded(id);
                true
            }
            ResidencyState::Loaded => {
                s.state = ResidencyState::Draining;
                false
            }
            ResidencyState::Unloaded => {
                self.slots.remove(&id);
                false
            }
            ResidencyState::Loading | ResidencyState::Draining => false,
        }
    }

    /// Unloaded, idle models whose `keep_alive` has run out at `now` (they are marked
    /// unloaded; the caller drops their engines).
    pub fn expired(&mut self, now: Instant) -> Vec<SlotId> {
        let out: Vec<SlotId> = self
            .slots
            .iter()
            .filter(|(_, s)| {
                !s.pinned
                    && s.state == ResidencyState::Loaded
                    && s.leases == 0
                    && s.waiting == 0
                    && s.keep_alive
                        .is_some_and(|k| now.saturating_duration_since(s.last_used) >= k)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &out {
            self.unloaded(*id);
        }
        out
    }

    fn unloaded(&mut self, id: SlotId) {
        let Some(s) = self.slots.get_mut(&id) else {
            return;
        };
        s.state = ResidencyState::Unloaded;
        s.unloads_total += 1;
        if s.retired {
            self.slots.remove(&id);
        }
    }
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
