//! Service classes: the order *between* classes of traffic, above the weighted-fair order
//! between customers ([`crate::fair`]) that holds *within* a class.
//!
//! `priority` > `default` > `flex` > `batch`. Admission and the slots of each step go to the
//! highest class with work waiting; a lower class uses whatever the higher ones leave, so with
//! nothing of a higher class the engine is a lower class's whole (work-conserving). A
//! lower-class sequence that a higher class crowds out of the steps keeps its KV and its place
//! in the running set, and goes on where it stopped when slots are free again. `batch` alone
//! waits for idle capacity: its sequences sit the steps out while any other class runs
//! ([`crate::engine`]'s step members), so a batch costs interactive traffic nothing but its
//! admission.

use crate::fair::{FairQueue, Found, Tenant, Visit};

/// A class of service, highest first (the derived order: `Priority < Default`, and a smaller
/// class is served first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum ServiceClass {
    /// Sold with a latency target: first to start, first to a step's slots.
    Priority,
    /// Everyone's traffic unless said otherwise.
    #[default]
    Default,
    /// Cheaper, served from what `priority` and `default` leave.
    Flex,
    /// Jobs that may wait for idle capacity (the Batch API, background responses).
    Batch,
}

impl ServiceClass {
    /// Every class, highest first.
    pub const ALL: [ServiceClass; 4] = [Self::Priority, Self::Default, Self::Flex, Self::Batch];

    /// The name OpenAI's `service_tier` and Tollgate's records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Priority => "priority",
            Self::Default => "default",
            Self::Flex => "flex",
            Self::Batch => "batch",
        }
    }

    /// Whether it is sold with a first-token goal (`priority`, `default`), unlike work that
    /// can wait (`flex`, `batch`).
    pub fn interactive(self) -> bool {
        self <= Self::Default
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ServiceClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Waiting items by class, each class in weighted-fair order between tenants.
#[derive(Debug)]
pub struct ClassQueues<T> {
    queues: [FairQueue<T>; 4],
}

impl<T> Default for ClassQueues<T> {
    fn default() -> Self {
        Self {
            queues: std::array::from_fn(|_| FairQueue::new()),
        }
    }
}

impl<T> ClassQueues<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.queues.iter().map(FairQueue::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(FairQueue::is_empty)
    }

    /// Items waiting in `class`.
    pub fn waiting(&self, class: ServiceClass) -> usize {
        self.queues[class.index()].len()
    }

    /// The highest class with items waiting.
    pub fn top_class(&self) -> Option<ServiceClass> {
        ServiceClass::ALL
            .into_iter()
            .find(|c| !self.queues[c.index()].is_empty())
    }

    /// The item served first if nothing is passed over: the first in fair order of the
    /// highest class waiting.
    pub fn front(&self) -> Option<(&Tenant, &T)> {
        self.top_class()
            .and_then(|c| self.queues[c.index()].front())
    }

    /// Queues `item` of `tenant` in `class` (see [`FairQueue::push`]).
    pub fn push(&mut self, class: ServiceClass, tenant: Tenant, weight: u32, cost: f64, item: T) {
        self.queues[class.index()].push(tenant, weight, cost, item);
    }

    /// Takes the first item that `visit` lets go, the highest class first and within a class
    /// in fair order ([`FairQueue::pop_first`]). [`Visit::Stop`] ends the search in every
    /// class: an item that must not be overtaken (its KV does not fit yet) is not overtaken by
    /// a lower class either.
    pub fn pop_first(
        &mut self,
        mut visit: impl FnMut(ServiceClass, &Tenant, &T) -> Visit,
    ) -> Option<(ServiceClass, Tenant, T)> {
        for class in ServiceClass::ALL {
            match self.queues[class.index()].find_first(|tenant, item| visit(class, tenant, item)) {
                Found::Taken(tenant, item) => return Some((class, tenant, item)),
                Found::Stopped => return None,
                Found::None => {}
            }
        }
        None
    }

    /// Every waiting item, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.queues.iter().flat_map(FairQueue::iter)
    }

    /// Keeps the items `keep` approves; returns how many were dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> usize {
        self.queues.iter_mut().map(|q| q.retain(&mut keep)).sum()
    }

    /// Tenants the queues keep state for, over all classes.
    pub fn tenants(&self) -> usize {
        self.queues.iter().map(FairQueue::tenants).sum()
    }

    /// [`FairQueue::forget_idle`] in every class.
    pub fn forget_idle(&mut self, keep: usize) {
        for q in &mut self.queues {
            q.forget_idle(keep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Tenant {
        Tenant::from(name)
    }

    #[test]
    fn the_highest_class_with_work_goes_first_and_fair_order_holds_within_it() {
        let mut q = ClassQueues::new();
        q.push(ServiceClass::Batch, t("a"), 1, 10.0, "batch-a");
        q.push(ServiceClass::Flex, t("a"), 1, 10.0, "flex-a0");
        q.push(ServiceClass::Flex, t("a"), 1, 10.0, "flex-a1");
        q.push(ServiceClass::Flex, t("b"), 1, 10.0, "flex-b0");
        q.push(ServiceClass::Priority, t("c"), 1, 10.0, "priority-c");
        q.push(ServiceClass::Default, t("d"), 1, 10.0, "default-d");
        assert_eq!(q.len(), 6);
        assert_eq!(q.waiting(ServiceClass::Flex), 3);
        let order: Vec<&str> =
            std::iter::from_fn(|| q.pop_first(|_, _, _| Visit::Take).map(|(_, _, x)| x)).collect();
        // Within flex, a and b alternate (a0 first by name at equal virtual times).
        assert_eq!(
            order,
            [
                "priority-c",
                "default-d",
                "flex-a0",
                "flex-b0",
                "flex-a1",
                "batch-a"
            ]
        );
        assert!(q.is_empty());
    }

    /// A stop in a higher class stops the search: what a priority request waits for (KV
    /// memory) is not taken by flex requests behind it.
    #[test]
    fn a_stop_in_a_higher_class_is_not_overtaken_by_a_lower_one() {
        let mut q = ClassQueues::new();
        q.push(ServiceClass::Priority, t("p"), 1, 10.0, "big-priority");
        q.push(ServiceClass::Flex, t("f"), 1, 10.0, "small-flex");
        let stop_big = |_: ServiceClass, _: &Tenant, x: &&str| {
            if *x == "big-priority" {
                Visit::Stop
            } else {
                Visit::Take
            }
        };
        assert_eq!(q.pop_first(stop_big), None);
        // A pass (its tenant over its share) lets the lower class go.
        let pass_big = |_: ServiceClass, _: &Tenant, x: &&str| {
            if *x == "big-priority" {
                Visit::Pass
            } else {
                Visit::Take
            }
        };
        let taken = q.pop_first(pass_big);
        assert_eq!(
            taken.map(|(c, _, x)| (c, x)),
            Some((ServiceClass::Flex, "small-flex"))
        );
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn classes_are_ordered_highest_first_and_named_as_openai_does() {
        let mut all = ServiceClass::ALL;
        all.sort();
        assert_eq!(all, ServiceClass::ALL);
        assert!(ServiceClass::Priority < ServiceClass::Batch);
        let names: Vec<&str> = all.iter().map(|c| c.as_str()).collect();
        assert_eq!(names, ["priority", "default", "flex", "batch"]);
        assert_eq!(ServiceClass::default(), ServiceClass::Default);
    }
}
