//! Where a sequence's drafts come from and how long they are: draft-free speculative decoding.
//!
//! A draft is a guess of the tokens that follow a sequence's last sampled token. The step feeds
//! them after that token and the forward pass returns the logits of every position; the worker
//! samples each position in order exactly as it would without a draft and keeps going only
//! while the token it sampled is the draft's next one (so the output cannot depend on the
//! draft). This module only proposes: from the continuation of the request's prediction
//! (OpenAI's Predicted Outputs) where the output follows it, else from the most recent earlier
//! occurrence of the output's last few tokens in the prompt and the output so far (n-gram
//! lookup, llama.cpp's `ngram-simple`). Draft lengths follow the recent acceptance, and a
//! sequence whose drafts keep failing waits longer and longer before it drafts again.
//!
//! It does not verify drafts, sample, or touch the KV cache (the worker and
//! [`super::sequence`] do).

/// Longest suffix of the output looked up in the context.
const MAX_NGRAM: usize = 3;
/// Shortest: a single token matches too often in prose to be worth a draft.
const MIN_NGRAM: usize = 2;
/// Tokens of context searched at most (the most recent ones).
const SEARCH_WINDOW: usize = 8192;
/// Longest wait, in steps, after drafts that failed again and again.
const MAX_BACKOFF: u32 = 16;

/// Where a draft came from (accepted and rejected prediction tokens are reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Prediction,
    Lookup,
}

/// One sequence's speculation state.
#[derive(Debug)]
pub(super) struct Speculation {
    /// The request's predicted output, if any.
    prediction: Vec<u32>,
    /// Where the output stands in the prediction: its next token is expected to be
    /// `prediction[at]`. `None` while the output does not follow it.
    at: Option<usize>,
    /// The length of the next draft.
    len: usize,
    /// Steps to wait before the next draft, and the wait after the next failure.
    wait: u32,
    backoff: u32,
    /// The current draft and where it came from.
    pub(super) draft: Vec<u32>,
    pub(super) source: Source,
    /// Prediction tokens verified and kept, and verified and rejected.
    pub(super) accepted_prediction: usize,
    pub(super) rejected_prediction: usize,
    /// Draft tokens verified and kept (any source).
    pub(super) accepted: usize,
}

impl Speculation {
    pub(super) fn new(prediction: Option<Vec<u32>>) -> Self {
        let prediction = prediction.unwrap_or_default();
        Self {
            at: (!prediction.is_empty()).then_some(0),
            prediction,
            len: 4,
            wait: 0,
            backoff: 1,
            draft: Vec::new(),
            source: Source::Lookup,
            accepted_prediction: 0,
            rejected_prediction: 0,
            accepted: 0,
        }
    }

    /// Proposes a draft of at most `max` tokens after `context` (prompt then output, ending
    /// with the last sampled token) into `self.draft`; empty when there is none or the
    /// sequence waits after failed drafts.
    pub(super) fn propose(&mut self, context: &[u32], max: usize) {
        self.draft.clear();
        if self.wait > 0 {
            self.wait -= 1;
            return;
        }
        let len = self.len.min(max);
        if len == 0 {
            return;
        }
        if let Some(at) = self.at {
            let end = (at + len).min(self.prediction.len());
            if at < end {
                self.draft.extend_from_slice(&self.prediction[at..end]);
                self.source = Source::Prediction;
                return;
            }
        }
        self.draft = lookup(context, len);
        self.source = Source::Lookup;
    }

    /// Records the verification of the current draft: `kept` of its tokens were sampled
    /// there. Adapts the next length (the longest draft `max`).
    pub(super) fn verified(&mut self, kept: usize, max: usize) {
        let drafted = self.draft.len();
        if drafted == 0 {
            return;
        }
        self.accepted += kept;
        if self.source == Source::Prediction {
            self.accepted_prediction += kept;
            self.rejected_prediction += drafted - kept;
        }
        if kept == drafted {
            self.len = (self.len * 2).min(max.max(1));
            self.backoff = 1;
        } else {
            self.len = (kept + 1).clamp(1, max.max(1));
            if kept == 0 {
                self.wait = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            } else {
                self.backoff = 1;
            }
        }
        self.draft.clear();
    }

    /// Moves the prediction's alignment past the output's newest token (the last of
    /// `output`); where the output leaves the prediction, finds it again by its last tokens.
    pub(super) fn follow(&mut self, output: &[u32]) {
        let Some(&token) = output.last() else {
            return;
        };
        if self.prediction.is_empty() {
            return;
        }
        self.at = match self.at {
            Some(at) if self.prediction.get(at) == Some(&token) => Some(at + 1),
            _ => realign(&self.prediction, output),
        };
    }
}

/// Where the prediction goes on after `output`'s last tokens: after the first occurrence of
/// its last `MAX_NGRAM` (down to `MIN_NGRAM`) tokens in the prediction.
fn realign(prediction: &[u32], output: &[u32]) -> Option<usize> {
    for n in (MIN_NGRAM..=MAX_NGRAM.min(output.len())).rev() {
        let tail = &output[output.len() - n..];
        if let Some(i) = prediction.windows(n).position(|w| w == tail) {
            return Some(i + n);
        }
    }
    None
}

/// The continuation, `len` tokens at most, of the most recent earlier occurrence of
/// `context`'s last `MAX_NGRAM` (down to `MIN_NGRAM`) tokens; empty when none occurs.
pub(super) fn lookup(context: &[u32], len: usize) -> Vec<u32> {
    let window = &context[context.len().saturating_sub(SEARCH_WINDOW)..];
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if window.len() <= n {
            continue;
        }
        let tail = &window[window.len() - n..];
        // Occurrences that end before the last token, most recent first.
        let found = (0..window.len() - n)
            .rev()
            .find(|&i| &window[i..i + n] == tail);
        if let Some(i) = found {
            let from = i + n;
            let end = (from + len).min(window.len());
            return window[from..end].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_continues_the_most_recent_earlier_occurrence() {
        // "1 2 3" occurs twice before the end; the later one is followed by 7 8.
        let context = [1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 1, 2, 3];
        assert_eq!(lookup(&context, 2), vec![7, 8]);
        assert_eq!(lookup(&context, 10), vec![7, 8, 9, 1, 2, 3]);
        // Only the last two tokens occur earlier.
        assert_eq!(lookup(&[5, 2, 3, 6, 9, 2, 3], 3), vec![6, 9, 2]);
        // A single token is not enough.
        assert!(lookup(&[4, 5, 6, 5], 3).is_empty());
        assert!(lookup(&[1, 2], 3).is_empty());
    }

    #[test]
    fn draft_length_follows_acceptance_and_failures_back_off() {
        let context = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2];
        let mut s = Speculation::new(None);
        s.propose(&context, 8);
        assert_eq!(s.draft, vec![3, 4, 5, 6]);
        s.verified(4, 8);
        s.propose(&context, 8);
        assert_eq!(s.draft.len(), 8, "all kept: twice as long");
        s.verified(2, 8);
        s.propose(&context, 8);
        assert_eq!(s.draft.len(), 3, "two kept: one more than kept");
        s.propose(&context, 2);
        assert_eq!(s.draft.len(), 2, "never longer than the room left");
        // Two failures in a row: wait 1 step, then 2.
        s.verified(0, 8);
        s.propose(&context, 8);
        assert!(s.draft.is_empty());
        s.propose(&context, 8);
        assert_eq!(s.draft.len(), 1);
        s.verified(0, 8);
        for _ in 0..2 {
            s.propose(&context, 8);
            assert!(s.draft.is_empty());
        }
        s.propose(&context, 8);
        assert_eq!(s.draft.len(), 1);
        assert_eq!(s.accepted, 6);
    }

    #[test]
    fn a_prediction_is_drafted_where_the_output_follows_it_and_found_again_after_an_edit() {
        let prediction = vec![10, 11, 12, 13, 14, 15, 16, 17];
        let mut s = Speculation::new(Some(prediction));
        let mut output = vec![10];
        s.follow(&output);
        s.propose(&output, 3);
        assert_eq!(
            (s.draft.clone(), s.source),
            (vec![11, 12, 13], Source::Prediction)
        );
        // Two kept, the third position sampled 99: the output left the prediction.
        s.verified(2, 8);
        for t in [11, 12, 99] {
            output.push(t);
            s.follow(&output);
        }
        assert_eq!((s.accepted_prediction, s.rejected_prediction), (2, 1));
        s.propose(&output, 8);
        assert_ne!(s.source, Source::Prediction);
        // The output picks the prediction up again: "13 14" is found in it.
        for t in [13, 14] {
            output.push(t);
            s.follow(&output);
        }
        s.propose(&output, 8);
        assert_eq!(
            (s.draft.clone(), s.source),
            (vec![15, 16, 17], Source::Prediction)
        );
    }
}
