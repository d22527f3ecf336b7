//! Choosing the next token from logits: penalties (repetition, frequency, presence),
//! temperature, top-k, top-p, seeded randomness, and log probabilities with alternatives.
//!
//! One [`Sampler`] per sequence owns its RNG and token counts, so sequences sampled in the same
//! batch never influence each other. Logprobs are the log-softmax of the logits after penalties
//! and before temperature/top-k/top-p (what the model believes, as OpenAI reports it).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// Sampling controls of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub seed: Option<u64>,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// 1.0 means off.
    pub repetition_penalty: f32,
    /// Number of alternatives to report with each token's logprob.
    pub logprobs: Option<usize>,
    /// OpenAI's `logit_bias`: added to these tokens' logits before anything else picks from
    /// them (-100 bans a token, +100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: None,
            logit_bias: Vec::new(),
        }
    }
}

/// Largest `logit_bias` magnitude (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// Most alternatives one token may report.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingParams {
    /// Checks ranges as OpenAI does; the message names the value.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |param: &'static str, message: String| Err(Error::InvalidParam { param, message });
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad(
                "temperature",
                format!("{} is not between 0 and 2", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        for (param, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(param, format!("{v} is not between -2 and 2"));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!("{} must be greater than 0", self.repetition_penalty),
            );
        }
        if let Some(&(token, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(b))
        {
            return bad(
                "logit_bias",
                format!("the bias {b} of token {token} is not between -100 and 100"),
            );
        }
        if let Some(k) = self.logprobs {
            if k > MAX_TOP_LOGPROBS {
                return bad(
                    "top_logprobs",
                    format!("{k} is more than {MAX_TOP_LOGPROBS}"),
                );
            }
        }
        Ok(())
    }
}

/// The chosen token with its logprob and the most likely alternatives (best first).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The sampler of one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Generated-token counts, for frequency and presence penalties.
    generated: HashMap<u32, u32>,
    /// Prompt and generated tokens, for the repetition penalty.
    seen: HashMap<u32, ()>,
    /// Reused buffers.
    order: Vec<u32>,
    probs: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt_tokens: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let seen = if params.repetition_penalty != 1.0 {
            prompt_tokens.iter().map(|&t| (t, ())).collect()
        } else {
            HashMap::new()
        };
        Self {
            params,
            rng,
            generated: HashMap::new(),
            seen,
            order: Vec::new(),
            probs: Vec::new(),
        }
    }

    /// Picks the next token from `logits` (modified in place) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
        }
        self.apply_penalties(logits);
        let lse = log_sum_exp(logits);
        let token = if self.params.temperature <= 1e-5 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let logprob = logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - lse);
        let top = match self.params.logprobs {
            Some(k) if k > 0 => top_k_indices(logits, k, &mut self.order)
                .iter()
                .map(|&i| (i, logits[i as usize] - lse))
                .collect(),
            _ => Vec::new(),
        };
        *self.generated.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token, ());
        }
        Sampled {
            token,
            logprob,
            top,
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &t in self.seen.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &count) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
    }

    /// Temperature, top-k and top-p, then a draw from what is left.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.params.temperature;
        let k = match self.params.top_k {
            0 => logits.len(),
            k => k.min(logits.len()),
        };
        // Candidates: the top-k (or all), sorted by logit when top-p needs an order.
        let candidates: Vec<u32> = if k < logits.len() {
            top_k_indices(logits, k, &mut self.order)
        } else {
            (0..logits.len() as u32).collect()
        };
        let max = candidates
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        self.probs.clear();
        self.probs.extend(
            candidates
                .iter()
                .map(|&i| ((logits[i as usize] - max) * inv_t).exp()),
        );
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        let mut total: f32 = self.probs.iter().sum();
        if self.params.top_p < 1.0 {
            order
                .sort_unstable_by(|&a, &b| self.probs[b].total_cmp(&self.probs[a]).then(a.cmp(&b)));
            let mut cumulative = 0.0;
            let mut keep = 0;
            for &i in &order {
                cumulative += self.probs[i];
                keep += 1;
                if cumulative >= self.params.top_p * total {
                    break;
                }
            }
            order.truncate(keep.max(1));
            total = order.iter().map(|&i| self.probs[i]).sum();
        }
        let mut target = self.rng.random::<f32>() * total;
        for &i in &order {
            target -= self.probs[i];
            if target <= 0.0 {
                return candidates[i];
            }
        }
        // Rounding left a sliver: the last candidate takes it.
        order
            .last()
            .map_or_else(|| argmax(logits), |&i| candidates[i])
    }
}

/// Index of the largest logit; ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    max + sum.ln()
}

/// The `k` largest logits' indices, best first (ties by lower id), without a full sort.
fn top_k_indices(logits: &[f32], k: usize, buf: &mut Vec<u32>) -> Vec<u32> {
    let k = k.min(logits.len());
    buf.clear();
    buf.extend(0..logits.len() as u32);
    let cmp = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k == 0 {
        return Vec::new();
    }
    if k < buf.len() {
        buf.select_nth_unstable_by(k - 1, cmp);
    }
    let mut top = buf[..k].to_vec();
    top.sort_unstable_by(cmp);
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.5, 2.9, 0.0, 1.5]
    }

    fn run(p: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p, &[]);
        (0..n).map(|_| s.sample(&mut logits()).token).collect()
    }

    #[test]
    fn greedy_is_argmax_with_ties_to_the_lowest_id() {
        assert_eq!(run(params(0.0, 1), 3), vec![1, 1, 1]);
        assert_eq!(argmax(&[2.0, 5.0, 5.0, 1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn same_seed_same_tokens_different_seeds_differ() {
        let a = run(params(1.0, 42), 50);
        assert_eq!(a, run(params(1.0, 42), 50));
        assert_ne!(a, run(params(1.0, 43), 50));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let p = SamplingParams {
            top_k: 1,
            ..params(1.5, 7)
        };
        assert!(run(p, 40).iter().all(|&t| t == 1));
        let p = SamplingParams {
            top_p: 1e-6,
            ..params(1.5, 7)
        };
        assert!(run(p, 40).iter().all(|&t| t == 1));
    }

    #[test]
    fn top_k_restricts_to_the_best_candidates() {
        let p = SamplingParams {
            top_k: 3,
            ..params(2.0, 3)
        };
        assert!(run(p, 300).iter().all(|t| [1, 5, 2].contains(t)));
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let small = [0.0f32, 1.0, 2.0];
        let z: f32 = small.iter().map(|l| l.exp()).sum();
        let expected: Vec<f32> = small.iter().map(|l| l.exp() / z).collect();
        let mut s = Sampler::new(params(1.0, 11), &[]);
        let n = 20_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&mut small.to_vec()).token as usize] += 1;
        }
        for i in 0..3 {
            let f = counts[i] as f32 / n as f32;
            assert!(
                (f - expected[i]).abs() < 0.02,
                "token {i}: {f} vs {}",
                expected[i]
            );
        }
        // A low temperature sharpens the distribution towards the best token.
        let mut s = Sampler::new(params(0.2, 11), &[]);
        let best = (0..2000)
            .filter(|_| s.sample(&mut small.to_vec()).token == 2)
            .count();
        assert!(best > 1900, "{best}");
    }

    #[test]
    fn penalties_change_the_choice() {
        // Presence penalty: after token 1 is generated once it loses 2.0 and 5 (2.9) wins.
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 2.0,
                ..params(0.0, 1)
            },
            &[],
        );
        assert_eq!(s.sample(&mut logits()).token, 1);
        assert_eq!(s.sample(&mut logits()).token, 5);
        // Repetition penalty counts the prompt: 1 and 5 were in it.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..params(0.0, 1)
            },
            &[1, 5],
        );
        assert_eq!(s.sample(&mut logits()).token, 2);
        // Frequency penalty grows with the count.
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 0.3,
                ..params(0.0, 1)
            },
            &[],
        );
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&mut logits()).token).collect();
        assert_eq!(picks, vec![1, 5, 1, 5]);
    }

    #[test]
    fn logit_bias_moves_the_choice_and_the_logprobs() {
        // -100 bans the best token (1): the runner-up 5 (2.9) wins; +5 lifts 3 (-1.0) above all.
        let ban = |bias| SamplingParams {
            logit_bias: bias,
            logprobs: Some(1),
            ..params(0.0, 1)
        };
        let mut s = Sampler::new(ban(vec![(1, -100.0)]), &[]);
        let picked = s.sample(&mut logits());
        assert_eq!(picked.token, 5);
        assert_eq!(picked.top[0].0, 5);
        assert_eq!(run(ban(vec![(3, 5.0)]), 2), vec![3, 3]);
        // An id past the logits (the backend refuses it first) changes nothing.
        assert_eq!(run(ban(vec![(99, 100.0)]), 1), vec![1]);
        assert!(ban(vec![(1, 100.5)]).validate().is_err());
        assert!(ban(vec![(1, -100.0), (2, 100.0)]).validate().is_ok());
    }

    #[test]
    fn logprobs_are_normalised_and_top_is_sorted() {
        let mut s = Sampler::new(
            SamplingParams {
                logprobs: Some(4),
                ..params(0.0, 1)
            },
            &[],
        );
        let out = s.sample(&mut logits());
        assert_eq!(out.top.len(), 4);
        assert_eq!(out.top[0].0, out.token);
        assert!((out.top[0].1 - out.logprob).abs() < 1e-6);
        assert!(out.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let total: f32 = logits()
            .iter()
            .map(|l| (l - log_sum_exp(&logits())).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(out.logprob < 0.0);
    }

    #[test]
    fn nan_and_infinite_logits_do_not_panic() {
        let mut s = Sampler::new(params(1.0, 5), &[]);
        let t = s.sample(&mut [f32::NAN, 1.0, f32::NEG_INFINITY]).token;
        assert_eq!(t, 1);
        let t = s.sample(&mut [f32::NAN, f32::NAN]).token;
        assert!(t < 2);
    }

    #[test]
    fn validation_names_the_value() {
        let err = SamplingParams {
            temperature: 3.5,
            ..SamplingParams::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("3.5"), "{err}");
        assert!(SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            presence_penalty: -2.5,
            ..SamplingParams::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            logprobs: Some(21),
            ..SamplingParams::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
