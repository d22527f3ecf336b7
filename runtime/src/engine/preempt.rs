//! Preemption: when the first request of the highest class waiting cannot start because the
//! running set or the KV memory is full, and it could start without some lower-class running
//! sequences, the lowest-class one admitted last gives its KV back ([`Desk::evict`]), one at a
//! time until the request fits. A preempted sequence waits in `Desk::evicted`, with everything
//! but its cache (its sampler, grammar, detokenizer, the tokens it sampled), and comes back
//! when it fits again and nothing of a higher class waits: its prompt and its sampled tokens
//! are fed again ([`Feed::Replay`](super::sequence::Feed)), the prefix cache sparing what it
//! holds, and it goes on exactly where it stopped. Its stream stays open meanwhile: nothing
//! fails.
//!
//! A lower class crowded out of the steps without a shortage of memory keeps its cache and
//! just sits the steps out ([`super::admission::step_members`]).

use std::sync::atomic::Ordering;

use super::admission::{admission, Admission, Member};
use super::desk::{kv_need, tenancy, Desk};
use super::sequence::Sequence;
use crate::model::LlamaModel;

/// Preempts lower-class running sequences while the first request of the highest class
/// waiting needs their room; returns how many were preempted.
pub(super) fn make_room(desk: &mut Desk, running: &mut Vec<Sequence>, model: &LlamaModel) -> usize {
    let per_token = model.kv_bytes_per_token();
    let Some((tenant, weight, class, need)) = desk.waiting.front().map(|(_, sub)| {
        let (tenant, weight, class) = tenancy(&sub.request);
        (tenant, weight, class, kv_need(sub, per_token))
    }) else {
        return 0;
    };
    let (max_running, budget) = (desk.config.max_running, desk.config.kv_cache_bytes);
    let rule = |members: &[Member], reserved: usize| {
        admission(
            members.iter().map(|(t, w, c)| (t, *w, *c)),
            (&tenant, weight, class),
            max_running,
            (reserved, need, budget),
        )
    };
    let members: Vec<Member> = running.iter().map(Sequence::member).collect();
    if rule(&members, desk.reserved_bytes) == Admission::Admit {
        return 0;
    }
    // Would it start without every lower-class sequence? If not, preempting helps nothing.
    let higher: Vec<Member> = members.iter().filter(|m| m.2 <= class).cloned().collect();
    let lower_bytes: usize = running
        .iter()
        .filter(|s| s.class > class)
        .map(|s| s.reserved_bytes)
        .sum();
    if rule(&higher, desk.reserved_bytes - lower_bytes) != Admission::Admit {
        return 0;
    }
    let mut preempted = 0;
    loop {
        let members: Vec<Member> = running.iter().map(Sequence::member).collect();
        if rule(&members, desk.reserved_bytes) == Admission::Admit {
            break;
        }
        // The lowest class, and in it the sequence admitted last.
        let Some(victim) = (0..running.len())
            .filter(|&i| running[i].class > class)
            .max_by_key(|&i| (running[i].class, i))
        else {
            break;
        };
        let seq = running.remove(victim);
        desk.evict(seq, model);
        preempted += 1;
    }
    desk.stats
        .preemptions_total
        .fetch_add(preempted as u64, Ordering::Relaxed);
    preempted
}

/// Preempts a running sequence whatever waits: of those that decoded since they last came
/// back (so each makes progress between its preemptions), the one preempted least often
/// ([`EngineConfig::preempt_every`](super::EngineConfig::preempt_every)).
pub(super) fn force(desk: &mut Desk, running: &mut Vec<Sequence>, model: &LlamaModel) {
    let Some(victim) = (0..running.len())
        .filter(|&i| running[i].decoded_since_resume)
        .min_by_key(|&i| (running[i].preemptions, i))
    else {
        return;
    };
    desk.evict(running.remove(victim), model);
    desk.stats.preemptions_total.fetch_add(1, Ordering::Relaxed);
}

/// Brings preempted sequences back, the highest class first, while they fit and nothing of a
/// higher class waits.
pub(super) fn resume(desk: &mut Desk, running: &mut Vec<Sequence>, model: &LlamaModel) {
    let mut i = 0;
    while i < desk.evicted.len() {
        let seq = &desk.evicted[i];
        let outranked = desk.waiting.top_class().is_some_and(|c| c < seq.class);
        let members: Vec<Member> = running.iter().map(Sequence::member).collect();
        let rule = admission(
            members.iter().map(|(t, w, c)| (t, *w, *c)),
            (&seq.tenant, seq.weight, seq.class),
            desk.config.max_running,
            (
                desk.reserved_bytes,
                seq.reserved_bytes,
                desk.config.kv_cache_bytes,
            ),
        );
        match rule {
            // What it waits for is not taken by a lower class behind it.
            Admission::NoKvRoom if !outranked => break,
            Admission::Admit if !outranked => {}
            _ => {
                i += 1;
                continue;
            }
        }
        let seq = desk.evicted.remove(i);
        running.push(desk.readmit(seq, model));
    }
}
