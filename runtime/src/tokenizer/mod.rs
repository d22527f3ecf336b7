//! The model's own tokenizer: a `tokenizers::Tokenizer` built from GGUF metadata (BPE vocab and
//! merges, the pre-tokenizer its `tokenizer.ggml.pre` names, control tokens as special tokens)
//! or loaded from `tokenizer.json` / `tokenizer_config.json` for safetensors models, plus the
//! special tokens and chat template that come with it.
//!
//! It does not render templates (`chat_template`) or stream text (`detokenize`).
//!
//! The two sources build it in `gguf.rs` and `dir.rs`; this module holds the tokenizer itself:
//! encoding, decoding to bytes and text, and its special tokens.

use std::collections::HashMap;

use tokenizers::Tokenizer;

use crate::{Error, Result};

mod dir;
mod gguf;

/// A model's tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct ModelTokenizer {
    inner: Tokenizer,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    stop_ids: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    /// Raw bytes of every token id (byte-level mapping undone), for logprobs and streaming.
    token_bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    /// SentencePiece with `add_space_prefix`: [`Self::decode`] drops the space the prefix put
    /// before the first token, as llama.cpp's detokenizer does.
    strip_space_prefix: bool,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab_size", &self.token_bytes.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("stop_ids", &self.stop_ids)
            .finish_non_exhaustive()
    }
}

/// GPT-2's byte-level alphabet: each byte maps to a printable char; this is the inverse.
fn byte_level_decoder_table() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = HashMap::with_capacity(256);
    let mut extra = 0u32;
    for b in 0u32..256 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        if let (Some(ch), Ok(byte)) = (char::from_u32(c), u8::try_from(b)) {
            table.insert(ch, byte);
        }
    }
    table
}

impl ModelTokenizer {
    fn finish(
        inner: Tokenizer,
        bos: Option<(u32, String)>,
        eos: Option<(u32, String)>,
        stop_ids: Vec<u32>,
        add_bos: bool,
        chat_template: Option<String>,
        special: Vec<bool>,
    ) -> Result<Self> {
        let table = byte_level_decoder_table();
        let vocab = inner.get_vocab_size(true);
        let token_bytes = (0..vocab as u32)
            .map(|id| {
                let piece = inner.id_to_token(id).unwrap_or_default();
                let mapped: Option<Vec<u8>> =
                    piece.chars().map(|c| table.get(&c).copied()).collect();
                // Tokens outside the byte-level alphabet (added tokens) are their own UTF-8.
                mapped.unwrap_or_else(|| piece.into_bytes())
            })
            .collect();
        Ok(Self {
            inner,
            bos,
            eos,
            stop_ids,
            add_bos,
            chat_template,
            token_bytes,
            special,
            strip_space_prefix: false,
        })
    }

    /// Encodes text; special tokens written in the text (`<|im_start|>`) become their ids.
    /// `add_special_tokens` adds the BOS token when the model asks for it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special_tokens && self.add_bos {
            if let Some((bos, _)) = &self.bos {
                ids.push(*bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut bytes = self.decode_bytes(ids, skip_special_tokens);
        let first_is_text = ids.first().is_some_and(|&id| !self.is_special(id));
        if self.strip_space_prefix && first_is_text && bytes.first() == Some(&b' ') {
            bytes.remove(0);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The raw bytes of a token sequence (may end inside a UTF-8 character).
    pub fn decode_bytes(&self, ids: &[u32], skip_special_tokens: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if skip_special_tokens && self.is_special(id) {
                continue;
            }
            if let Some(b) = self.token_bytes.get(id as usize) {
                out.extend_from_slice(b);
            }
        }
        out
    }

    /// Whether a token is a control token (never shown in generated text).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The text of one token (lossy when the token is part of a multi-byte character).
    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.token_bytes(id)).into_owned()
    }

    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.token_bytes
            .get(id as usize)
            .cloned()
            .unwrap_or_default()
    }

    pub fn bos_token(&self) -> Option<(u32, String)> {
        self.bos.clone()
    }

    pub fn eos_token(&self) -> Option<(u32, String)> {
        self.eos.clone()
    }

    /// Ids that end generation (EOS, end-of-turn).
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// The development model's tokenizer, for the tests of the modules that use one.
#[cfg(test)]
pub(crate) fn dev_tokenizer() -> std::sync::Arc<ModelTokenizer> {
    let path = crate::dev_model::require_dev_model().unwrap();
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    std::sync::Arc::new(ModelTokenizer::from_gguf(&content).unwrap())
}

#[cfg(test)]
mod tests {
    use super::gguf::{pre_tokenizer_for, PreTokenizer};
    use super::*;

    #[test]
    fn round_trips_text() {
        let t = dev_tokenizer();
        for text in [
            "Hello, world! How are you?",
            "  leading spaces, tabs\tand\nnewlines  ",
            "Ünïcödé — 東京 🚀 12345",
        ] {
            let ids = t.encode(text, true).unwrap();
            assert_eq!(t.decode(&ids, true).unwrap(), text);
        }
    }

    #[test]
    fn hello_is_one_token_without_prefix_space() {
        let t = dev_tokenizer();
        let ids = t.encode("Hello", true).unwrap();
        assert_eq!(ids.len(), 1, "{ids:?}");
        assert_eq!(t.token_text(ids[0]), "Hello");
        let spaced = t.encode(" Hello", true).unwrap();
        assert_ne!(spaced, ids);
    }

    #[test]
    fn special_tokens_and_digits() {
        let t = dev_tokenizer();
        assert_eq!(t.encode("<|im_start|>", false).unwrap(), vec![1]);
        assert_eq!(t.encode("<|im_end|>", false).unwrap(), vec![2]);
        assert_eq!(t.bos_token().unwrap().1, "<|im_start|>");
        assert_eq!(t.eos_token(), Some((2, "<|im_end|>".to_string())));
        assert!(t.stop_token_ids().contains(&2));
        assert!(!t.add_bos());
        assert!(t.is_special(2));
        // Digits are split one by one.
        assert_eq!(t.encode("2024", false).unwrap().len(), 4);
        assert!(t.chat_template().unwrap().contains("<|im_start|>"));
        assert_eq!(t.vocab_size(), 49152);
    }

    #[test]
    fn from_dir_reads_tokenizer_json_and_config() {
        let t = dev_tokenizer();
        let dir = std::env::temp_dir().join(format!("tollgate-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        t.inner().save(dir.join("tokenizer.json"), false).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": "{{ messages[0]['content'] }}"}"#,
        )
        .unwrap();
        let d = ModelTokenizer::from_dir(&dir).unwrap();
        let text = "Hello, world! How are you?";
        assert_eq!(
            d.encode(text, false).unwrap(),
            t.encode(text, false).unwrap()
        );
        assert_eq!(d.eos_token(), Some((2, "<|im_end|>".into())));
        assert_eq!(d.stop_token_ids(), &[2]);
        assert_eq!(d.chat_template(), Some("{{ messages[0]['content'] }}"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        assert!(pre_tokenizer_for("no-such-pre").is_none());
        assert_eq!(
            pre_tokenizer_for("smollm"),
            Some(PreTokenizer::DigitsThenGpt2)
        );
    }
}
