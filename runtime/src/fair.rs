//! Tenant-fair scheduling policy of the engine, kept pure so it is tested on its own:
//!
//! * [`FairQueue`]: waiting requests ordered by weighted fair queueing between tenants (start-time
//!   fair queueing): each tenant has a virtual time that advances by a request's cost divided by
//!   the tenant's weight when one of its requests is admitted, and the tenant with the smallest
//!   virtual time goes next; within a tenant, arrival order. A tenant that was idle starts at
//!   the virtual time of the busiest-served backlog, so idleness banks no credit.
//! * [`shares`]: how many batch slots each tenant's running sequences get in one step
//!   (weighted max-min fairness, "water-filling"): every tenant gets up to its weighted share,
//!   and slots a tenant cannot use go to the others, so a lone tenant uses them all
//!   (work-conserving).
//!
//! Tenants are customers; the engine knows them only as names and weights.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A tenant's name (`""` for requests without one).
pub type Tenant = Arc<str>;

#[derive(Debug)]
struct TenantQueue<T> {
    items: VecDeque<(f64, T)>,
    weight: f64,
    /// Virtual time at which this tenant's next request starts.
    vtime: f64,
}

/// Waiting items in weighted-fair order across tenants.
#[derive(Debug)]
pub struct FairQueue<T> {
    tenants: HashMap<Tenant, TenantQueue<T>>,
    /// Virtual time of the last admission (the system's progress).
    clock: f64,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            tenants: HashMap::new(),
            clock: 0.0,
            len: 0,
        }
    }
}

impl<T> FairQueue<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `item` of `tenant` (weight ≥ 1) costing `cost` units of service (tokens).
    pub fn push(&mut self, tenant: Tenant, weight: u32, cost: f64, item: T) {
        let clock = self.clock;
        let q = self.tenants.entry(tenant).or_insert_with(|| TenantQueue {
            items: VecDeque::new(),
            weight: 1.0,
            vtime: clock,
        });
        if q.items.is_empty() {
            // Back from idle: no credit for the time away.
            q.vtime = q.vtime.max(clock);
        }
        q.weight = f64::from(weight.max(1));
        q.items.push_back((cost.max(1.0), item));
        self.len += 1;
    }

    /// The tenants with waiting items, in the order they are served.
    fn order(&self) -> Vec<&Tenant> {
        let mut order: Vec<(&Tenant, f64)> = self
            .tenants
            .iter()
            .filter(|(_, q)| !q.items.is_empty())
            .map(|(t, q)| (t, q.vtime))
            .collect();
        // Ties in a stable order (names), never hash order.
        order.sort_by(|(a, av), (b, bv)| av.total_cmp(bv).then_with(|| a.cmp(b)));
        order.into_iter().map(|(t, _)| t).collect()
    }

    /// The item [`pop`](Self::pop) would take, left in place.
    pub fn front(&self) -> Option<(&Tenant, &T)> {
        let tenant = *self.order().first()?;
        let (_, item) = self.tenants.get(tenant)?.items.front()?;
        Some((tenant, item))
    }

    /// Takes the next item, advancing its tenant's virtual time.
    pub fn pop(&mut self) -> Option<(Tenant, T)> {
        self.pop_first(|_, _| Visit::Take)
    }

    /// Takes the first item, in the order tenants are served, that `visit` lets go. Each
    /// tenant is offered its oldest item: [`Visit::Pass`] moves on to the next tenant (one
    /// that may not start now, such as a tenant over its share of the batch, does not hold up
    /// the others), [`Visit::Stop`] ends the search.
    pub fn pop_first(&mut self, visit: impl FnMut(&Tenant, &T) -> Visit) -> Option<(Tenant, T)> {
        match self.find_first(visit) {
            Found::Taken(tenant, item) => Some((tenant, item)),
            Found::Stopped | Found::None => None,
        }
    }

    /// [`pop_first`](Self::pop_first), saying whether the search was stopped or found
    /// nothing to take.
    pub fn find_first(&mut self, mut visit: impl FnMut(&Tenant, &T) -> Visit) -> Found<T> {
        let mut chosen = None;
        for tenant in self.order() {
            let Some((_, front)) = self.tenants.get(tenant).and_then(|q| q.items.front()) else {
                continue;
            };
            match visit(tenant, front) {
                Visit::Take => {
                    chosen = Some(tenant.clone());
                    break;
                }
                Visit::Pass => continue,
                Visit::Stop => return Found::Stopped,
            }
        }
        let Some(tenant) = chosen else {
            return Found::None;
        };
        let Some(q) = self.tenants.get_mut(&tenant) else {
            return Found::None;
        };
        let Some((cost, item)) = q.items.pop_front() else {
            return Found::None;
        };
        self.clock = self.clock.max(q.vtime);
        q.vtime += cost / q.weight;
        self.len -= 1;
        Found::Taken(tenant, item)
    }

    /// Every waiting item, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.tenants
            .values()
            .flat_map(|q| q.items.iter().map(|(_, item)| item))
    }

    /// Keeps the items `keep` approves; returns how many were dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> usize {
        let mut dropped = 0;
        for q in self.tenants.values_mut() {
            let before = q.items.len();
            q.items.retain(|(_, item)| keep(item));
            dropped += before - q.items.len();
        }
        self.len -= dropped;
        dropped
    }

    /// Tenants the queue keeps state for: those with waiting items and the idle ones not
    /// forgotten yet ([`forget_idle`](Self::forget_idle)).
    pub fn tenants(&self) -> usize {
        self.tenants.len()
    }

    /// Forgets idle tenants whose virtual time is behind the clock (they would be reset on
    /// their next push anyway), and of the idle tenants still ahead of it keeps the `keep`
    /// furthest ahead, so the map holds the tenants with waiting items plus at most `keep`
    /// others, however many tenants were ever seen. A forgotten tenant that comes back starts
    /// at the clock: it gains at most its last request's cost of credit, and those with the
    /// least to gain are forgotten first.
    pub fn forget_idle(&mut self, keep: usize) {
        let clock = self.clock;
        self.tenants
            .retain(|_, q| !q.items.is_empty() || q.vtime > clock);
        let mut idle: Vec<(f64, Tenant)> = self
            .tenants
            .iter()
            .filter(|(_, q)| q.items.is_empty())
            .map(|(t, q)| (q.vtime, t.clone()))
            .collect();
        if idle.len() <= keep {
            return;
        }
        // Furthest ahead first; ties by name, never hash order.
        idle.sort_by(|(av, a), (bv, b)| bv.total_cmp(av).then_with(|| a.cmp(b)));
        for (_, tenant) in &idle[keep..] {
            self.tenants.remove(tenant);
        }
    }
}

/// What [`FairQueue::find_first`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<T> {
    Taken(Tenant, T),
    /// A visit said [`Visit::Stop`].
    Stopped,
    /// Every tenant was passed over, or nothing waits.
    None,
}

/// What [`FairQueue::pop_first`] does with a tenant's oldest item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    Take,
    Pass,
    Stop,
}

/// Batch slots per tenant for one step: `demand` is `(tenant, weight, running sequences)`;
/// returns each tenant's slot count, in the same order. Weighted max-min fair: no tenant gets
/// more than it can use, and the slots left over go to those that can use more.
pub fn shares(demand: &[(Tenant, u32, usize)], slots: usize) -> Vec<usize> {
    let mut given = vec![0usize; demand.len()];
    let mut left = slots;
    loop {
        let hungry: Vec<usize> = (0..demand.len())
            .filter(|&i| given[i] < demand[i].2)
            .collect();
        if hungry.is_empty() || left == 0 {
            return given;
        }
        let total_weight: u64 = hungry.iter().map(|&i| u64::from(demand[i].1.max(1))).sum();
        let mut handed = 0;
        for &i in &hungry {
            let w = u64::from(demand[i].1.max(1));
            // This round's share, at least one slot so progress is made.
            let share = ((left as u64 * w) / total_weight).max(1) as usize;
            let take = share.min(demand[i].2 - given[i]).min(left - handed);
            given[i] += take;
            handed += take;
            if handed == left {
                break;
            }
        }
        left -= handed;
        if handed == 0 {
            return given;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Tenant {
        Arc::from(name)
    }

    #[test]
    fn a_burst_does_not_delay_another_tenant() {
        let mut q = FairQueue::new();
        for i in 0..64 {
            q.push(t("a"), 1, 100.0, format!("a{i}"));
        }
        // A was served a few requests already.
        for _ in 0..3 {
            q.pop();
        }
        q.push(t("b"), 1, 100.0, "b0".to_string());
        assert_eq!(q.pop().map(|(_, x)| x), Some("b0".to_string()));
        assert_eq!(q.pop().map(|(_, x)| x), Some("a3".to_string()));
        assert_eq!(q.len(), 60);
    }

    #[test]
    fn weights_split_admissions() {
        let mut q = FairQueue::new();
        for i in 0..30 {
            q.push(t("gold"), 2, 10.0, i);
            q.push(t("free"), 1, 10.0, i);
        }
        let mut gold = 0;
        for _ in 0..30 {
            if q.pop().is_some_and(|(tenant, _)| &*tenant == "gold") {
                gold += 1;
            }
        }
        assert_eq!(gold, 20, "2:1 weights give 2/3 of the admissions");
    }

    #[test]
    fn an_idle_tenant_banks_no_credit() {
        let mut q = FairQueue::new();
        q.push(t("b"), 1, 10.0, 0);
        q.pop();
        for i in 0..10 {
            q.push(t("a"), 1, 10.0, i);
        }
        for _ in 0..5 {
            q.pop();
        }
        // B comes back after A was served 5 times: B goes next once, then they alternate.
        q.push(t("b"), 1, 10.0, 100);
        q.push(t("b"), 1, 10.0, 101);
        let order: Vec<String> = (0..4)
            .filter_map(|_| q.pop().map(|(tenant, _)| tenant.to_string()))
            .collect();
        assert_eq!(order, ["b", "a", "b", "a"]);
    }

    #[test]
    fn retain_then_pop() {
        let mut q = FairQueue::new();
        q.push(t("a"), 1, 1.0, 1);
        q.push(t("a"), 1, 1.0, 2);
        q.push(t("b"), 1, 1.0, 3);
        assert_eq!(q.retain(|&x| x != 1), 1);
        assert_eq!(q.len(), 2);
        let next = q.pop().map(|(tenant, item)| (tenant.to_string(), item));
        assert_eq!(next, Some(("a".to_string(), 2)));
        q.pop();
        assert!(q.is_empty());
        q.forget_idle(0);
        assert_eq!(q.tenants(), 0);
    }

    /// 100,000 customers come, are served once and go, as the engine sees them: the queue
    /// forgets them (the engine calls `forget_idle` at every step boundary), so its map, and
    /// the work of choosing the next request, follows the customers with requests waiting,
    /// not every customer ever seen.
    #[test]
    fn customers_that_came_and_went_are_forgotten() {
        const KEEP: usize = 32;
        let mut q = FairQueue::new();
        let mut most = 0;
        for i in 0..100_000u32 {
            // A few arrive per step; one long-lived customer keeps a backlog.
            q.push(t(&format!("c{i}")), 1, 50.0, i);
            if i % 4 == 0 {
                q.push(t("busy"), 1, 50.0, i);
            }
            if i % 2 == 1 {
                while q.len() > 3 {
                    q.pop();
                }
                q.forget_idle(KEEP);
                assert!(
                    q.tenants() <= KEEP + q.len(),
                    "{} tenants kept",
                    q.tenants()
                );
            }
            most = most.max(q.tenants());
        }
        assert!(most <= KEEP + 6, "the queue kept {most} tenants");
        // A forgotten customer that comes back is served like a new one.
        while q.pop().is_some() {}
        q.push(t("c7"), 1, 50.0, 7);
        assert_eq!(q.pop().map(|(_, x)| x), Some(7));
    }

    #[test]
    fn a_passed_tenant_keeps_its_place_and_a_stop_takes_nothing() {
        let mut q = FairQueue::new();
        for i in 0..3 {
            q.push(t("a"), 1, 10.0, format!("a{i}"));
        }
        q.push(t("b"), 1, 10.0, "b0".to_string());
        q.push(t("c"), 1, 10.0, "c0".to_string());
        // A goes first ("a" < "b" at equal virtual times) but is passed over: B is taken.
        let mut offered = Vec::new();
        let taken = q.pop_first(|tenant, item| {
            offered.push(item.clone());
            if &**tenant == "a" {
                Visit::Pass
            } else {
                Visit::Take
            }
        });
        assert_eq!(
            offered,
            ["a0", "b0"],
            "each tenant's oldest item, in serving order"
        );
        assert_eq!(taken.map(|(_, x)| x).as_deref(), Some("b0"));
        // A stop at the first tenant takes nothing and moves nothing.
        assert!(q.pop_first(|_, _| Visit::Stop).is_none());
        assert_eq!(q.len(), 4);
        // A, never served, is still first; C follows; B, served, comes last.
        let order: Vec<String> = (0..3).filter_map(|_| q.pop().map(|(_, x)| x)).collect();
        assert_eq!(order, ["a0", "c0", "a1"]);
    }

    #[test]
    fn shares_are_max_min_fair_and_work_conserving() {
        let d = |v: &[(&str, u32, usize)]| -> Vec<(Tenant, u32, usize)> {
            v.iter().map(|&(n, w, r)| (t(n), w, r)).collect()
        };
        assert_eq!(shares(&d(&[("a", 1, 40)]), 32), [32]);
        assert_eq!(shares(&d(&[("a", 1, 32), ("b", 1, 1)]), 32), [31, 1]);
        assert_eq!(shares(&d(&[("a", 1, 32), ("b", 1, 32)]), 32), [16, 16]);
        assert_eq!(shares(&d(&[("a", 3, 32), ("b", 1, 32)]), 32), [24, 8]);
        assert_eq!(shares(&d(&[("a", 1, 5), ("b", 1, 3)]), 32), [5, 3]);
        let three = shares(&d(&[("a", 1, 20), ("b", 1, 20), ("c", 1, 2)]), 32);
        assert_eq!(three.iter().sum::<usize>(), 32);
        assert_eq!(three[2], 2);
        assert!(three[0].abs_diff(three[1]) <= 1);
    }
}
