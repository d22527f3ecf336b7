//! Who starts next: the admission rule of the engine's queue, on plain numbers so it is
//! tested without a model. A waiting sequence starts when its KV fits and, with the batch full,
//! when its tenant runs fewer sequences than its weighted fair share.

use crate::fair::{shares, Tenant, Visit};

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

/// The admission rule. A sequence of `candidate` (tenant, weight) starts when its prompt and
/// output fit the KV budget (`(reserved, need, budget)` bytes) and either the batch has room
/// (`max_running`) or its tenant runs fewer sequences than its weighted fair share of the
/// batch, counting it (so a tenant that arrives at a full batch of another's still starts; the
/// running set stays under twice `max_running`).
pub(super) fn admission<'a>(
    running: impl Iterator<Item = (&'a Tenant, u32)> + Clone,
    candidate: (&'a Tenant, u32),
    max_running: usize,
    (reserved, need, budget): (usize, usize, usize),
) -> Admission {
    let count = running.clone().count();
    if count >= max_running {
        if count >= 2 * max_running {
            return Admission::OverShare;
        }
        let demand = tenant_demand(running.chain(std::iter::once(candidate)));
        let slots = shares(&demand, max_running);
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

/// Which running sequences, given as `(tenant, weight, step last run)`, take part in the next
/// forward pass of at most `cap` sequences: all of them while they fit; else each tenant's
/// weighted fair share of `cap`, its least recently run sequences first (ties by position).
pub(super) fn step_members(running: &[(&Tenant, u32, u64)], cap: usize) -> Vec<bool> {
    let n = running.len();
    let cap = cap.max(1);
    if n <= cap {
        return vec![true; n];
    }
    let demand = tenant_demand(running.iter().map(|&(t, w, _)| (t, w)));
    let slots = shares(&demand, cap);
    let mut chosen = vec![false; n];
    for ((tenant, _, _), &slot) in demand.iter().zip(&slots) {
        let mut mine: Vec<usize> = (0..n).filter(|&i| running[i].0 == tenant).collect();
        mine.sort_by_key(|&i| (running[i].2, i));
        for &i in mine.iter().take(slot) {
            chosen[i] = true;
        }
    }
    chosen
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

    fn t(name: &str) -> Tenant {
        Tenant::from(name)
    }

    /// `n` running sequences of each `(tenant, weight, n)`.
    fn running(v: &[(&Tenant, u32, usize)]) -> Vec<(Tenant, u32)> {
        v.iter()
            .flat_map(|&(tenant, w, n)| std::iter::repeat_n((tenant.clone(), w), n))
            .collect()
    }

    fn admit(
        r: &[(Tenant, u32)],
        who: (&Tenant, u32),
        max: usize,
        kv: (usize, usize, usize),
    ) -> Admission {
        admission(r.iter().map(|(t, w)| (t, *w)), who, max, kv)
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
            (&a, 1, 5),
            (&a, 1, 1),
            (&b, 1, 7),
            (&a, 1, 4),
            (&a, 1, 2),
            (&b, 1, 7),
            (&a, 1, 3),
            (&a, 1, 6),
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

    #[test]
    fn the_running_set_stays_under_twice_the_batch() {
        let (a, b) = (t("a"), t("b"));
        let r = running(&[(&a, 1, 8)]);
        assert_eq!(admit(&r, (&b, 1), 4, ROOM), Admission::OverShare);
    }
}
