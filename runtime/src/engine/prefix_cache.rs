//! The prefix cache: the KV of recently finished prompts, so a prompt that starts the same
//! way (a shared system prompt, a conversation's earlier turns) starts from a copy instead of
//! prefilling it again. A prompt's KV depends on the LoRA adapter it ran with, so entries are
//! keyed by adapter too: a prompt never starts from KV computed with another adapter (or
//! without one).

use std::collections::VecDeque;

use crate::model::KvCache;
use crate::Result;

/// Prompt tokens left to prefill when a prompt starts from a cached prefix (the last one's
/// logits are needed). Every row of a step runs the same arithmetic however prompts are
/// chunked, so a cached prefix gives the same output as prefilling it.
const PREFIX_SUFFIX_MIN: usize = 1;
/// Shortest prefix worth copying.
const PREFIX_MIN: usize = 4;
/// Most prompts kept (lookups compare against each).
const PREFIX_ENTRIES: usize = 64;

/// Which adapter a cached prompt ran with: [`crate::model::LoraAdapter::id`], `None` for the
/// base model.
pub(super) type AdapterKey = Option<u64>;

/// Prompts of finished sequences with their adapter and KV, most recently used first, bounded
/// in bytes.
pub(super) struct PrefixCache {
    entries: VecDeque<(AdapterKey, Vec<u32>, KvCache)>,
    bytes: usize,
    max_bytes: usize,
}

impl PrefixCache {
    pub(super) fn new(max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// KV memory held.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the cache keeps anything (a limit of 0 turns it off).
    pub(super) fn is_enabled(&self) -> bool {
        self.max_bytes > 0
    }

    /// Keeps `cache` (holding exactly `prompt`'s KV computed with `adapter`), evicting the
    /// least recently used.
    pub(super) fn insert(&mut self, adapter: AdapterKey, prompt: Vec<u32>, cache: KvCache) {
        let size = cache.bytes();
        if size > self.max_bytes {
            return;
        }
        if let Some(i) = self
            .entries
            .iter()
            .position(|(a, p, _)| *a == adapter && *p == prompt)
        {
            if let Some((_, _, old)) = self.entries.remove(i) {
                self.bytes -= old.bytes();
            }
        }
        self.bytes += size;
        self.entries.push_front((adapter, prompt, cache));
        while self.bytes > self.max_bytes || self.entries.len() > PREFIX_ENTRIES {
            match self.entries.pop_back() {
                Some((_, _, old)) => self.bytes -= old.bytes(),
                None => break,
            }
        }
    }

    /// The entry of `adapter` sharing the longest prefix with `prompt`, and how many tokens
    /// a lookup takes from it (leaving at least [`PREFIX_SUFFIX_MIN`] to prefill).
    fn best(&self, adapter: AdapterKey, prompt: &[u32]) -> Option<(usize, usize)> {
        let limit = prompt.len().saturating_sub(PREFIX_SUFFIX_MIN);
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, (a, _, _))| *a == adapter)
            .map(|(i, (_, p, _))| {
                let shared = p.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                (i, shared.min(limit))
            })
            .max_by_key(|&(i, len)| (len, std::cmp::Reverse(i)))
            .filter(|&(_, len)| len >= PREFIX_MIN)
    }

    /// Tokens of `prompt` a [`lookup`](Self::lookup) would take from the cache now.
    pub(super) fn matched(&self, adapter: AdapterKey, prompt: &[u32]) -> usize {
        self.best(adapter, prompt).map_or(0, |(_, len)| len)
    }

    /// A new cache with the longest prefix of `prompt` cached with `adapter`, leaving at
    /// least [`PREFIX_SUFFIX_MIN`] tokens to prefill.
    pub(super) fn lookup(
        &mut self,
        adapter: AdapterKey,
        prompt: &[u32],
    ) -> Result<Option<KvCache>> {
        let Some((i, len)) = self.best(adapter, prompt) else {
            return Ok(None);
        };
        let Some(entry) = self.entries.remove(i) else {
            return Ok(None);
        };
        let copy = entry.2.copy_prefix(len);
        self.entries.push_front(entry);
        copy.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// A one-layer host cache holding `prompt`, each token's key and value its id.
    fn cache_of(prompt: &[u32]) -> KvCache {
        let mut c = KvCache::new(1, 1, 2, DType::F32, Device::Cpu, true);
        let kv: Vec<f32> = prompt.iter().flat_map(|&t| [t as f32; 2]).collect();
        c.append_host(0, &kv, &kv).unwrap();
        c.advance(prompt.len());
        c
    }

    #[test]
    fn the_longest_shared_prefix_is_copied_leaving_one_token_to_prefill() {
        let mut cache = PrefixCache::new(1 << 20);
        cache.insert(None, vec![1, 2, 3, 4, 5, 6], cache_of(&[1, 2, 3, 4, 5, 6]));
        cache.insert(
            None,
            vec![1, 2, 3, 4, 9, 9, 9],
            cache_of(&[1, 2, 3, 4, 9, 9, 9]),
        );
        // Shares 5 tokens with the first entry, 4 with the second (the most recent).
        assert_eq!(cache.matched(None, &[1, 2, 3, 4, 5, 7, 8]), 5);
        let hit = cache.lookup(None, &[1, 2, 3, 4, 5, 7, 8]).unwrap().unwrap();
        assert_eq!(hit.len(), 5);
        let hit = cache.lookup(None, &[1, 2, 3, 4, 9, 7, 8]).unwrap().unwrap();
        assert_eq!(hit.len(), 5);
        // The whole prompt cached: its last token is still prefilled (its logits are needed).
        let hit = cache.lookup(None, &[1, 2, 3, 4, 5, 6]).unwrap().unwrap();
        assert_eq!(hit.len(), 5);
        // The entries stay for later lookups.
        assert_eq!(cache.entries.len(), 2);
    }

    /// KV computed with one adapter is never reused by a prompt running with another, or
    /// without one (nor the base model's by an adapter's prompt).
    #[test]
    fn entries_are_keyed_by_adapter() {
        let mut cache = PrefixCache::new(1 << 20);
        let prompt = [1, 2, 3, 4, 5, 6];
        cache.insert(Some(7), prompt.to_vec(), cache_of(&prompt));
        assert_eq!(cache.matched(Some(7), &prompt), 5);
        assert_eq!(cache.matched(None, &prompt), 0);
        assert_eq!(cache.matched(Some(8), &prompt), 0);
        assert!(cache.lookup(None, &prompt).unwrap().is_none());
        assert!(cache.lookup(Some(8), &prompt).unwrap().is_none());
        cache.insert(None, prompt.to_vec(), cache_of(&prompt));
        // The same prompt under two keys: two entries.
        assert_eq!(cache.entries.len(), 2);
        assert_eq!(cache.lookup(None, &prompt).unwrap().unwrap().len(), 5);
        assert_eq!(cache.lookup(Some(7), &prompt).unwrap().unwrap().len(), 5);
    }

    #[test]
    fn short_or_missing_prefixes_are_misses() {
        let mut cache = PrefixCache::new(1 << 20);
        cache.insert(None, vec![1, 2, 3, 4, 5, 6], cache_of(&[1, 2, 3, 4, 5, 6]));
        // Three shared tokens are below PREFIX_MIN.
        assert!(cache.lookup(None, &[1, 2, 3, 7, 7, 7]).unwrap().is_none());
        assert_eq!(cache.matched(None, &[1, 2, 3, 7, 7, 7]), 0);
        assert!(cache.lookup(None, &[9, 9, 9, 9, 9]).unwrap().is_none());
    }

    #[test]
    fn the_byte_bound_evicts_the_least_recently_used() {
        let one = cache_of(&[1, 2, 3, 4, 5]).bytes();
        let mut cache = PrefixCache::new(2 * one);
        cache.insert(None, vec![1, 2, 3, 4, 5], cache_of(&[1, 2, 3, 4, 5]));
        cache.insert(None, vec![6, 7, 8, 9, 10], cache_of(&[6, 7, 8, 9, 10]));
        // A lookup makes the first entry the most recently used ...
        assert!(cache.lookup(None, &[1, 2, 3, 4, 5, 0]).unwrap().is_some());
        // ... so the third insert evicts the second.
        cache.insert(
            None,
            vec![11, 12, 13, 14, 15],
            cache_of(&[11, 12, 13, 14, 15]),
        );
        assert_eq!(cache.bytes(), 2 * one);
        assert!(cache.lookup(None, &[6, 7, 8, 9, 10, 0]).unwrap().is_none());
        assert!(cache.lookup(None, &[1, 2, 3, 4, 5, 0]).unwrap().is_some());
        // Re-inserting a prompt replaces its entry rather than counting it twice.
        cache.insert(None, vec![1, 2, 3, 4, 5], cache_of(&[1, 2, 3, 4, 5]));
        assert_eq!(cache.bytes(), 2 * one);
        // A cache larger than the bound is not kept; a bound of 0 keeps nothing.
        let mut off = PrefixCache::new(0);
        assert!(!off.is_enabled());
        off.insert(None, vec![1, 2, 3, 4, 5], cache_of(&[1, 2, 3, 4, 5]));
        assert_eq!(off.bytes(), 0);
        assert!(off.lookup(None, &[1, 2, 3, 4, 5, 0]).unwrap().is_none());
    }
}
