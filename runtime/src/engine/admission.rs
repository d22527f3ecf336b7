//! Who starts next: the admission rule of the engine's queue, on plain numbers so it is
//! tested without a model. A waiting sequence starts when its KV fits and, with the batch full,
//! when its tenant runs fewer sequences than its weighted fair share of the slots its class
//! may use: those the higher classes leave ([`crate::classes`]).

use crate::classes::ServiceClass;
use crate::fair::{shares, Tenant, Visit};

/// A running (or candidate) sequence as admission sees it: its tenant, the tenant's weight
/// and its class.
pub(super) type Member = (Tenant, u32, ServiceClass);

/// Whether the front of the queue starts now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    Admit,
    /// The batch is full and its tenant already has its fair share of it.
    OverShare,
    /// Its prompt and output would not fit in the KV cache's budget.
    NoKvRoom,
}

impl Admission {
    /// What the queue does with the request: a tenant over its share is passed over for the
    /// next tenant, while a request whose KV does not fit stops admission (the smaller ones
    /// behind it would otherwise take the memory it waits for, again and again).
    pub(super) fn visit(self) -> Visit {
        match self {
            Self::Admit => Visit::Take,
            Self::OverShare => Visit::Pass,
            Self::NoKvRoom => Visit::Stop,
        }
    }
}

/// The admission rule. A sequence of `candidate` (tenant, weight, class) starts when its
/// prompt and output fit the KV budget (`(reserved, need, budget)` bytes) and either the batch
/// has room (`max_running`) or its tenant runs fewer sequences of its class than its weighted
/// fair share of the slots the higher classes leave to that class, counting it. So a tenant
/// that arrives at a full batch of another's still starts, a higher class starts beside a
/// batch full of lower ones (which it then crowds out of the steps, [`step_members`]), and a
/// lower class waits while the higher ones fill the batch. The running set stays under twice
/// `max_running`.
pub(super) fn admission<'a>(
    running: impl Iterator<Item = (&'a Tenant, u32, ServiceClass)> + Clone,
    candidate: (&'a Tenant, u32, ServiceClass),
    max_running: usize,
    (reserved, need, budget): (usize, usize, usize),
) -> Admission {
    let count = running.clone().count();
    if count >= max_running {
        if count >= 2 * max_running {
            return Admission::OverShare;
        }
        let class = candidate.2;
        let higher = running.clone().filter(|m| m.2 < class).count();
        let peers = running.filter(|m| m.2 == class).map(|(t, w, _)| (t, w));
        let demand = tenant_demand(peers.chain(std::iter::once((candidate.0, candidate.1))));
        let slots = shares(&demand, max_running.saturating_sub(higher));
        let under = demand
            .iter()
            .zip(&slots)
            .any(|((t, _, n), &slot)| t == candidate.0 && *n <= slot);
        if !under {
            return Admission::OverShare;
        }
    }
    if reserved + need > budget {
        return Admission::NoKvRoom;
    }
    Admission::Admit
}

/// Which running sequences, given as `(tenant, weight, step last run, class)`, take part in
/// the next forward pass of at most `cap` sequences: all of them while they fit; else the
/// highest class first, as many of it as fit, then the next class in what is left, and so on;
/// within a class each tenant's weighted fair share of the class's slots, its least recently
/// run sequences first (ties by position). A sequence left out keeps its KV and runs again
/// when slots are free. The `batch` class runs on idle capacity only: while a sequence of
/// any other class runs, batch sequences sit the steps out (each one more in a step slows
/// every other on a CPU), and they go on where they stopped when the others are done.
pub(super) fn step_members(running: &[(&Tenant, u32, u64, ServiceClass)], cap: usize) -> Vec<bool> {
    let n = running.len();
    let cap = cap.max(1);
    let others = running.iter().any(|r| r.3 != ServiceClass::Batch);
    let eligible = |i: usize| !others || running[i].3 != ServiceClass::Batch;
    if (0..n).filter(|&i| eligible(i)).count() <= cap {
        return (0..n).map(eligible).collect();
    }
    let mut chosen = vec![false; n];
    let mut left = cap;
    for class in ServiceClass::ALL {
        if others && class == ServiceClass::Batch {
            continue;
        }
        let members: Vec<usize> = (0..n).filter(|&i| running[i].3 == class).collect();
        let take = members.len().min(left);
        if take == 0 {
            continue;
        }
        left -= take;
        let demand = tenant_demand(members.iter().map(|&i| (running[i].0, running[i].1)));
        let slots = shares(&demand, take);
        for ((tenant, _, _), &slot) in demand.iter().zip(&slots) {
            let mut mine: Vec<usize> = members
                .iter()
                .copied()
                .filter(|&i| running[i].0 == tenant)
                .collect();
            mine.sort_by_key(|&i| (running[i].2, i));
            for &i in mine.iter().take(slot) {
                chosen[i] = true;
            }
        }
    }
    chosen
}

/// How many of a step's prompt chunks (prompts, and the tokens a preemption took out of a
/// cache), given by class in the order the step feeds them (highest class first), the step
/// takes: only those of the interactive classes when it has any, so newcomers sold with a
/// first-token goal (`priority`, `default`) do not wait for the prompts of work that can wait
/// (`flex`, `batch`) beside their own, which take the step after; but never two steps in a
/// row (`yielded`: the step before left some out), so work that can wait still prefills while
/// interactive newcomers keep coming.
pub(super) fn chunks_taken(classes: &[ServiceClass], yielded: bool) -> usize {
    let interactive = classes.iter().take_while(|c| c.interactive()).count();
    if interactive == 0 || yielded {
        classes.len()
    } else {
        interactive
    }
}

/// `(tenant, weight, running sequences)` of `entries`, in first-seen order.
pub(super) fn tenant_demand<'a>(
    entries: impl Iterator<Item = (&'a Tenant, u32)>,
) -> Vec<(Tenant, u32, usize)> {
    let mut demand: Vec<(Tenant, u32, usize)> = Vec::new();
    for (tenant, weight) in entries {
        match demand.iter_mut().find(|(t, _, _)| t == tenant) {
            Some(entry) => entry.2 += 1,
            None => demand.push((tenant.clone(), weight, 1)),
        }
    }
    demand
}

#[cfg(test)]
mod tests {
    use super::*;
    use ServiceClass::{Batch, Default, Flex, Priority};

    fn t(name: &str) -> Tenant {
        Tenant::from(name)
    }

    /// `n` running sequences of each `(tenant, weight, n)`, of the default class.
    fn running(v: &[(&Tenant, u32, usize)]) -> Vec<Member> {
        classed(
            &v.iter()
                .map(|&(t, w, n)| (t, w, n, Default))
                .collect::<Vec<_>>(),
        )
    }

    /// `n` running sequences of each `(tenant, weight, n, class)`.
    fn classed(v: &[(&Tenant, u32, usize, ServiceClass)]) -> Vec<Member> {
        v.iter()
            .flat_map(|&(tenant, w, n, c)| std::iter::repeat_n((tenant.clone(), w, c), n))
            .collect()
    }

    fn admit(
        r: &[Member],
        who: (&Tenant, u32),
        max: usize,
        kv: (usize, usize, usize),
    ) -> Admission {
        admit_as(r, (who.0, who.1, Default), max, kv)
    }

    fn admit_as(
        r: &[Member],
        who: (&Tenant, u32, ServiceClass),
        max: usize,
        kv: (usize, usize, usize),
    ) -> Admission {
        admission(r.iter().map(|(t, w, c)| (t, *w, *c)), who, max, kv)
    }

    const ROOM: (usize, usize, usize) = (0, 10, 100);

    #[test]
    fn a_batch_with_room_admits_anyone_whose_kv_fits() {
        let (a, b) = (t("a"), t("b"));
        let r = running(&[(&a, 1, 3)]);
        assert_eq!(admit(&r, (&b, 1), 4, ROOM), Admission::Admit);
        assert_eq!(admit(&r, (&a, 1), 4, ROOM), Admission::Admit);
        assert_eq!(admit(&r, (&a, 1), 4, (95, 10, 100)), Admission::NoKvRoom);
        assert_eq!(admit(&[], (&a, 1), 4, (0, 100, 100)), Admission::Admit);
    }

    /// One tenant filling the batch cannot keep another out: the newcomer is under its fair
    /// share and starts; the one that filled it waits.
    #[test]
    fn a_full_batch_admits_only_tenants_under_their_share() {
        let (a, b) = (t("a"), t("b"));
        let full_of_a = running(&[(&a, 1, 4)]);
        assert_eq!(admit(&full_of_a, (&a, 1), 4, ROOM), Admission::OverShare);
        assert_eq!(admit(&full_of_a, (&b, 1), 4, ROOM), Admission::Admit);
        // Equal weights, 2 and 2 of 4 slots: neither is under its share any more.
        let even = running(&[(&a, 1, 2), (&b, 1, 2)]);
        assert_eq!(admit(&even, (&b, 1), 4, ROOM), Admission::OverShare);
        // Weight 3 against 1: b's share of 4 is 3, so with 2 running it starts a third.
        let weighted = running(&[(&a, 1, 2), (&b, 3, 2)]);
        assert_eq!(admit(&weighted, (&b, 3), 4, ROOM), Admission::Admit);
        assert_eq!(admit(&weighted, (&a, 1), 4, ROOM), Admission::OverShare);
    }

    /// A step takes at most `cap` sequences: each tenant its share, least recently run
    /// first, so every sequence runs in turn.
    #[test]
    fn a_step_takes_each_tenants_share_least_recently_run_first() {
        let (a, b) = (t("a"), t("b"));
        // Six of a (last run at steps 5, 1, 4, 2, 3, 6) and two of b.
        let r = [
            (&a, 1, 5, Default),
            (&a, 1, 1, Default),
            (&b, 1, 7, Default),
            (&a, 1, 4, Default),
            (&a, 1, 2, Default),
            (&b, 1, 7, Default),
            (&a, 1, 3, Default),
            (&a, 1, 6, Default),
        ];
        assert_eq!(step_members(&r, 8), vec![true; 8]);
        // Four slots: two each; a's two least recently run are at steps 1 and 2.
        let four = step_members(&r, 4);
        let picked: Vec<usize> = (0..8).filter(|&i| four[i]).collect();
        assert_eq!(picked, vec![1, 2, 4, 5]);
        // Six slots: b needs only two, a takes the other four.
        assert_eq!(step_members(&r, 6).iter().filter(|&&c| c).count(), 6);
        assert!(step_members(&r, 6)[2] && step_members(&r, 6)[5]);
        // A cap of 0 still runs one sequence.
        assert_eq!(step_members(&r, 0).iter().filter(|&&c| c).count(), 1);
    }

    /// A higher class starts beside a batch full of a lower one; a lower class waits while
    /// the higher ones fill it, and takes what they leave.
    #[test]
    fn a_higher_class_starts_beside_a_full_batch_and_a_lower_one_takes_what_is_left() {
        let (p, f, d) = (t("p"), t("f"), t("d"));
        let full_of_flex = classed(&[(&f, 1, 4, Flex)]);
        assert_eq!(
            admit_as(&full_of_flex, (&p, 1, Priority), 4, ROOM),
            Admission::Admit
        );
        // The same tenant's priority request starts too: its flex sequences do not count
        // against its priority share.
        assert_eq!(
            admit_as(&full_of_flex, (&f, 1, Priority), 4, ROOM),
            Admission::Admit
        );
        assert_eq!(
            admit_as(&full_of_flex, (&f, 1, Flex), 4, ROOM),
            Admission::OverShare
        );
        // Priority fills the batch: default and flex wait, another priority tenant starts.
        let full_of_priority = classed(&[(&p, 1, 4, Priority)]);
        assert_eq!(
            admit_as(&full_of_priority, (&d, 1, Default), 4, ROOM),
            Admission::OverShare
        );
        assert_eq!(
            admit_as(&full_of_priority, (&f, 1, Flex), 4, ROOM),
            Admission::OverShare
        );
        assert_eq!(
            admit_as(&full_of_priority, (&d, 1, Priority), 4, ROOM),
            Admission::Admit
        );
        // Three priority leave one slot: a flex tenant with none running is under its share.
        let mixed = classed(&[(&p, 1, 3, Priority), (&d, 1, 1, Default)]);
        assert_eq!(
            admit_as(&mixed, (&f, 1, Flex), 4, ROOM),
            Admission::OverShare
        );
        let room = classed(&[(&p, 1, 3, Priority), (&f, 1, 1, Flex)]);
        assert_eq!(
            admit_as(&room, (&d, 1, Flex), 4, ROOM),
            Admission::OverShare
        );
        assert_eq!(admit_as(&room, (&d, 1, Default), 4, ROOM), Admission::Admit);
        // With the batch not full, any class starts (work-conserving).
        assert_eq!(
            admit_as(&classed(&[(&p, 1, 3, Priority)]), (&f, 1, Batch), 4, ROOM),
            Admission::Admit
        );
    }

    /// A step's slots go to the highest class first; a lower class runs in what is left,
    /// and with no higher class it has them all.
    #[test]
    fn a_step_fills_from_the_highest_class_down() {
        let (p, f, g) = (t("p"), t("f"), t("g"));
        let r = [
            (&f, 1, 1, Flex),
            (&p, 1, 9, Priority),
            (&g, 1, 2, Flex),
            (&f, 1, 3, Flex),
            (&p, 1, 9, Priority),
            (&g, 1, 4, Flex),
        ];
        let picked = |cap| -> Vec<usize> {
            let chosen = step_members(&r, cap);
            (0..r.len()).filter(|&i| chosen[i]).collect()
        };
        // Two slots: both priority; the flex sequences wait with their KV.
        assert_eq!(picked(2), vec![1, 4]);
        // Four: priority, then one flex slot each for f and g, least recently run first.
        assert_eq!(picked(4), vec![0, 1, 2, 4]);
        assert_eq!(picked(6), vec![0, 1, 2, 3, 4, 5]);
        // One slot: a priority sequence.
        assert_eq!(picked(1), vec![1]);
        let flex_only = [(&f, 1, 1, Flex), (&g, 1, 2, Flex), (&f, 1, 0, Flex)];
        assert_eq!(step_members(&flex_only, 2), vec![false, true, true]);
    }

    /// A wave of priority prompts and one of flex prompts come due together (their streams
    /// ended in the same step): the step prefills priority (and default) alone, flex the step
    /// after; a step after one that left flex out takes everything.
    #[test]
    fn work_that_can_wait_leaves_one_step_to_interactive_prompts() {
        assert_eq!(
            chunks_taken(&[Priority, Priority, Default, Flex, Flex, Batch], false),
            3
        );
        assert_eq!(chunks_taken(&[Priority, Default, Flex, Batch], true), 4);
        // With no interactive prompt, nothing is left out.
        assert_eq!(chunks_taken(&[Flex, Flex, Batch], false), 3);
        assert_eq!(chunks_taken(&[Default], false), 1);
        assert_eq!(chunks_taken(&[], false), 0);
    }

    /// Batch sequences run only when nothing else does, however many slots are free.
    #[test]
    fn the_batch_class_runs_on_idle_capacity_only() {
        let (d, b) = (t("d"), t("b"));
        let mixed = [(&b, 1, 1, Batch), (&d, 1, 9, Default), (&b, 1, 2, Batch)];
        assert_eq!(step_members(&mixed, 8), vec![false, true, false]);
        assert_eq!(step_members(&mixed, 1), vec![false, true, false]);
        let g = t("g");
        let batch_only = [(&b, 1, 1, Batch), (&g, 1, 2, Batch), (&b, 1, 0, Batch)];
        assert_eq!(step_members(&batch_only, 8), vec![true; 3]);
        assert_eq!(step_members(&batch_only, 2), vec![false, true, true]);
    }

    #[test]
    fn the_running_set_stays_under_twice_the_batch() {
        let (a, b) = (t("a"), t("b"));
        let r = running(&[(&a, 1, 8)]);
        assert_eq!(admit(&r, (&b, 1), 4, ROOM), Admission::OverShare);
    }
}
