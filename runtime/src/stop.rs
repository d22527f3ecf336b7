//! Stop strings over streamed text: matched across token boundaries, never emitted.
//!
//! Text that might be the beginning of a stop string is held back until the next pieces show
//! whether it is; everything else is released at once, so streaming stays prompt.

/// What to emit after a piece of text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text safe to show now.
    pub emit: String,
    /// A stop string matched: generation ends, nothing after `emit` is shown.
    pub stopped: bool,
}

/// Matches a sequence's stop strings against its streamed text.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Feeds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                emit: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopOutcome {
                emit: text.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        // The earliest full match wins.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let emit = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome {
                emit,
                stopped: true,
            };
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let suffix = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(suffix))
            })
            .unwrap_or(self.held.len());
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopOutcome {
            emit,
            stopped: false,
        }
    }

    /// End of generation without a match: releases what was held back.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn stream(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let o = m.push(p);
            out.push_str(&o.emit);
            if o.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    /// The reference: cut the whole text at the earliest occurrence of any stop string.
    fn truncate(stops: &[&str], text: &str) -> (String, bool) {
        match stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s))
            .min()
        {
            Some(at) => (text[..at].to_string(), true),
            None => (text.to_string(), false),
        }
    }

    #[test]
    fn matches_across_pieces_and_never_emits_the_stop() {
        assert_eq!(
            stream(&["Paris"], &["The capital is Pa", "ri", "s.", " Yes"]),
            ("The capital is ".into(), true)
        );
        assert_eq!(
            stream(&["aab"], &["a", "a", "a", "b", "c"]),
            ("a".into(), true)
        );
        assert_eq!(
            stream(&["xyz"], &["ab", "xy", "q"]),
            ("abxyq".into(), false)
        );
        assert_eq!(
            stream(&["END", "ST"], &["a S", "TOP END"]),
            ("a ".into(), true)
        );
        assert_eq!(stream(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(stream(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = StopMatcher::new(vec!["<end>".into()]);
        assert_eq!(m.push("hello <e").emit, "hello ");
        assert_eq!(m.push("x").emit, "<ex");
    }

    #[test]
    fn streamed_equals_truncated_on_random_splits() {
        let mut rng = StdRng::seed_from_u64(99);
        let alphabet: Vec<char> = "abé東 \n".chars().collect();
        let stop_sets: [&[&str]; 4] = [&["ab"], &["aab", "b a"], &["東\n", "éé"], &["a", "xyz"]];
        for case in 0..3000 {
            let len = rng.random_range(0..30);
            let text: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let chars: Vec<(usize, char)> = text.char_indices().collect();
            let mut cuts: Vec<usize> = chars
                .iter()
                .map(|(i, _)| *i)
                .filter(|_| rng.random_bool(0.4))
                .collect();
            cuts.push(text.len());
            let mut pieces = Vec::new();
            let mut prev = 0;
            for c in cuts {
                if c >= prev {
                    pieces.push(&text[prev..c]);
                    prev = c;
                }
            }
            let stops = stop_sets[case % stop_sets.len()];
            assert_eq!(
                stream(stops, &pieces),
                truncate(stops, &text),
                "text {text:?} pieces {pieces:?}"
            );
        }
    }
}
