//! Streaming detokenization: turns generated token ids into text deltas that never split a
//! UTF-8 character, and whose concatenation equals decoding all ids at once.
//!
//! Byte-level BPE tokens are byte strings; a character may span tokens. The decoder keeps the
//! bytes of an unfinished character and emits them when the character completes: constant work
//! per token, no re-decoding of the whole text.

use std::sync::Arc;

use crate::tokenizer::ModelTokenizer;
use crate::Result;

/// Incremental decoder for one sequence. Control tokens produce no text.
#[derive(Debug)]
pub struct StreamDecoder {
    tokenizer: Arc<ModelTokenizer>,
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new(tokenizer: Arc<ModelTokenizer>) -> Self {
        Self {
            tokenizer,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.tokenizer.is_special(id) {
            return Ok(String::new());
        }
        self.pending.extend(self.tokenizer.token_bytes(id));
        Ok(self.take_complete())
    }

    /// Ends the sequence: whatever is left (an unfinished character becomes U+FFFD, as a full
    /// decode would render it).
    pub fn finish(&mut self) -> Result<String> {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Ok(rest)
    }

    /// Moves every complete character out of `pending`; invalid bytes become U+FFFD exactly as
    /// `String::from_utf8_lossy` renders them.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid]));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + n;
                        }
                        None => {
                            // An unfinished character at the end: wait for more bytes.
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::dev_tokenizer;

    #[test]
    fn streamed_deltas_equal_the_full_decode() {
        let tok = dev_tokenizer();
        for text in [
            "Hello, world! How are you?",
            "Emoji 🚀🎉 and CJK 東京都 and accents àéîõü and 한국어",
            "<|im_start|>assistant\nThe capital is Paris.<|im_end|>",
        ] {
            let ids = tok.encode(text, false).unwrap();
            let mut dec = StreamDecoder::new(tok.clone());
            let mut streamed = String::new();
            for &id in &ids {
                let delta = dec.push(id).unwrap();
                assert!(!delta.contains('\u{FFFD}'), "broken character in {delta:?}");
                streamed.push_str(&delta);
            }
            streamed.push_str(&dec.finish().unwrap());
            assert_eq!(streamed, tok.decode(&ids, true).unwrap());
        }
    }

    #[test]
    fn multi_byte_characters_split_across_tokens_are_held_back() {
        let tok = dev_tokenizer();
        // Single-byte tokens of "é" (0xC3 0xA9): the first alone must not produce text.
        let ids: Vec<u32> = "é"
            .bytes()
            .map(|b| {
                (0..tok.vocab_size() as u32)
                    .find(|&id| tok.token_bytes(id) == [b])
                    .unwrap()
            })
            .collect();
        let mut dec = StreamDecoder::new(tok.clone());
        assert_eq!(dec.push(ids[0]).unwrap(), "");
        assert_eq!(dec.push(ids[1]).unwrap(), "é");
        // A dangling lead byte at the end renders like a full decode would.
        let mut dec = StreamDecoder::new(tok.clone());
        assert_eq!(dec.push(ids[0]).unwrap(), "");
        assert_eq!(dec.finish().unwrap(), tok.decode(&ids[..1], true).unwrap());
    }
}
