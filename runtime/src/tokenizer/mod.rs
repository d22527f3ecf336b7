//! The model's own tokenizer: a `tokenizers::Tokenizer` built from GGUF metadata (BPE vocab and
//! merges, the pre-tokenizer its `tokenizer.ggml.pre` names, control tokens as special tokens)
//! or loaded from `tokenizer.json` / `tokenizer_config.json` for safetensors models, plus the
//! special tokens and chat template that come with it.
//!
//! It does not render templates (`chat_template`) or stream text (`detokenize`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// GPT-4/Llama-3 style split: contractions, letters, numbers of up to three digits,
/// punctuation runs, newlines and spaces.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: like Llama 3 but numbers are single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// End-of-turn tokens of the model families, stop tokens whenever a vocabulary has them.
const FAMILY_STOP_TOKENS: [&str; 4] = ["<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>"];

/// How a GGUF `tokenizer.ggml.pre` value pre-tokenizes text. Byte-level throughout, never with
/// a prefix space (the model's text is taken as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizer {
    /// GPT-2 byte-level regex only.
    Gpt2,
    /// Every digit on its own, then GPT-2 byte-level (SmolLM, StarCoder).
    DigitsThenGpt2,
    /// A custom split regex, then byte-level without its own regex.
    Regex(&'static str),
}

/// The table of known pre-tokenizer types.
fn pre_tokenizer_for(pre: &str) -> Option<PreTokenizer> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" | "olmo" | "jais" => PreTokenizer::Gpt2,
        "smollm" | "starcoder" | "refact" => PreTokenizer::DigitsThenGpt2,
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx" => {
            PreTokenizer::Regex(LLAMA3_REGEX)
        }
        "qwen2" | "deepseek-r1-qwen" => PreTokenizer::Regex(QWEN2_REGEX),
        _ => return None,
    })
}

fn build_pre_tokenizer(kind: PreTokenizer) -> Result<PreTokenizerWrapper> {
    Ok(match kind {
        PreTokenizer::Gpt2 => ByteLevel::new(false, true, true).into(),
        PreTokenizer::DigitsThenGpt2 => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        PreTokenizer::Regex(regex) => {
            let split = Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(format!("invalid pre-tokenizer regex: {e}")))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
    })
}

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

fn meta<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content.metadata.get(key).ok_or_else(|| Error::Metadata {
        key: key.to_string(),
    })
}

fn meta_u32(content: &Content, key: &str) -> Option<u32> {
    let v = content.metadata.get(key)?;
    v.to_u32()
        .ok()
        .or_else(|| v.to_i32().ok().and_then(|i| u32::try_from(i).ok()))
        .or_else(|| v.to_u64().ok().and_then(|i| u32::try_from(i).ok()))
}

fn string_list(content: &Content, key: &str) -> Result<Vec<String>> {
    let bad = || Error::Metadata {
        key: key.to_string(),
    };
    meta(content, key)?
        .to_vec()
        .map_err(|_| bad())?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| bad()))
        .collect()
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
    /// Builds the tokenizer from a GGUF file's metadata: byte-level BPE (`tokenizer.ggml.model`
    /// `gpt2`) or SentencePiece (`llama`, see [`crate::spm`]).
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let model = meta(content, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|_| Error::Metadata {
                key: "tokenizer.ggml.model".into(),
            })?
            .clone();
        let tokens = string_list(content, "tokenizer.ggml.tokens")?;
        let token_types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|_| Error::Metadata {
                    key: "tokenizer.ggml.token_type".into(),
                })?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let (mut inner, space_prefix) = match model.as_str() {
            "gpt2" => (Self::byte_level_bpe(content, &tokens)?, None),
            "llama" => {
                let bad = || Error::Metadata {
                    key: "tokenizer.ggml.scores".into(),
                };
                let scores: Vec<f32> = meta(content, "tokenizer.ggml.scores")?
                    .to_vec()
                    .map_err(|_| bad())?
                    .iter()
                    .map(|v| v.to_f32().map_err(|_| bad()))
                    .collect::<Result<_>>()?;
                // llama.cpp's default for SentencePiece vocabularies is to add the prefix.
                let add_space_prefix = content
                    .metadata
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(|v| v.to_bool().ok())
                    .unwrap_or(true);
                let unk = meta_u32(content, "tokenizer.ggml.unknown_token_id")
                    .and_then(|id| tokens.get(id as usize))
                    .map(String::as_str);
                let inner =
                    crate::spm::tokenizer(&tokens, &scores, &token_types, unk, add_space_prefix)?;
                (inner, Some(add_space_prefix))
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "unsupported GGUF tokenizer model `{other}` (supported: gpt2 byte-level BPE, llama SentencePiece); use the safetensors form with tokenizer.json"
                )))
            }
        };
        // Control (3) and user-defined (4) tokens are matched whole in text, never split.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&token_types)
            .filter(|(_, &ty)| ty == 3 || ty == 4)
            .map(|(t, &ty)| AddedToken::from(t.clone(), ty == 3))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| Error::Tokenizer(format!("cannot add special tokens: {e}")))?;
        let mut tokenizer = Self::gguf_special_tokens(content, inner, &tokens, &token_types)?;
        if let Some(prefix) = space_prefix {
            tokenizer.token_bytes = tokens
                .iter()
                .zip(&token_types)
                .map(|(t, &ty)| crate::spm::token_bytes(t, ty))
                .collect();
            tokenizer.strip_space_prefix = prefix;
        }
        Ok(tokenizer)
    }

    /// The byte-level BPE of a `gpt2` GGUF vocabulary with the pre-tokenizer its
    /// `tokenizer.ggml.pre` names.
    fn byte_level_bpe(content: &Content, tokens: &[String]) -> Result<Tokenizer> {
        let pre = content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".to_string());
        let pre_kind = pre_tokenizer_for(&pre).ok_or_else(|| {
            Error::Tokenizer(format!(
                "unknown pre-tokenizer `{pre}` in tokenizer.ggml.pre (known: default, gpt2, smollm, starcoder, llama-bpe, llama3, qwen2)"
            ))
        })?;
        // Split straight from the metadata (no intermediate copy of 280k strings for a 128k
        // vocabulary: less memory held while the weights load beside it).
        let key = "tokenizer.ggml.merges";
        let bad = || Error::Metadata {
            key: key.to_string(),
        };
        let merges = meta(content, key)?
            .to_vec()
            .map_err(|_| bad())?
            .iter()
            .map(|v| {
                let m = v.to_string().map_err(|_| bad())?;
                match m.split_once(' ') {
                    Some((a, b)) => Ok((a.to_string(), b.to_string())),
                    None => Err(Error::Tokenizer(format!("malformed merge `{m}`"))),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        // llama.cpp takes a pre-token that is itself a token whole, without merging, for
        // these (as Llama 3's tokenizer.json does with `ignore_merges`).
        let ignore_merges = matches!(pre.as_str(), "llama3" | "llama-v3" | "llama-bpe");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("cannot build BPE: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(build_pre_tokenizer(pre_kind)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(inner)
    }

    /// BOS, EOS, stop tokens, `add_bos` and the chat template of a GGUF file.
    fn gguf_special_tokens(
        content: &Content,
        inner: Tokenizer,
        tokens: &[String],
        token_types: &[i32],
    ) -> Result<Self> {
        let name = |id: u32| tokens.get(id as usize).cloned();
        let bos =
            meta_u32(content, "tokenizer.ggml.bos_token_id").and_then(|id| Some((id, name(id)?)));
        let eos =
            meta_u32(content, "tokenizer.ggml.eos_token_id").and_then(|id| Some((id, name(id)?)));
        let mut stop_ids: Vec<u32> = ["eos", "eot", "eom"]
            .iter()
            .filter_map(|k| meta_u32(content, &format!("tokenizer.ggml.{k}_token_id")))
            .collect();
        // The families' end-of-turn tokens, which GGUF files do not always name in metadata
        // (Llama 3: <|eot_id|> ends a turn, <|eom_id|> a tool call; ChatML <|im_end|>; Phi-3
        // <|end|>), when the vocabulary has them as control tokens.
        stop_ids.extend(
            tokens
                .iter()
                .zip(token_types)
                .enumerate()
                .filter_map(|(id, (t, &ty))| {
                    (ty == 3 && FAMILY_STOP_TOKENS.contains(&t.as_str())).then_some(id as u32)
                }),
        );
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let add_bos = content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let chat_template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        let special = (0..tokens.len())
            .map(|i| matches!(token_types.get(i), Some(3)))
            .collect();
        Self::finish(inner, bos, eos, stop_ids, add_bos, chat_template, special)
    }

    /// Loads `tokenizer.json` and `tokenizer_config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", cfg_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(source) => {
                return Err(Error::Io {
                    path: cfg_path,
                    source,
                })
            }
        };
        // Special tokens are strings or {"content": ...} objects.
        let token_of = |key: &str| -> Option<(u32, String)> {
            let v = cfg.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            Some((inner.token_to_id(s)?, s.to_string()))
        };
        let bos = token_of("bos_token");
        let eos = token_of("eos_token");
        let mut stop_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        // generation_config.json may name more end tokens (Llama 3: <|eot_id|>).
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
            if let Ok(gen) = serde_json::from_str::<serde_json::Value>(&text) {
                match gen.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => {
                        stop_ids.extend(n.as_u64().and_then(|n| u32::try_from(n).ok()))
                    }
                    Some(serde_json::Value::Array(a)) => stop_ids.extend(
                        a.iter()
                            .filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok())),
                    ),
                    _ => {}
                }
            }
        }
        for name in ["<|eot_id|>", "<|im_end|>", "<|end_of_text|>"] {
            if let Some(id) = inner.token_to_id(name) {
                if eos.as_ref().map(|(e, _)| *e) == Some(id) || name == "<|eot_id|>" {
                    stop_ids.push(id);
                }
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let vocab = inner.get_vocab_size(true);
        let added = inner.get_added_tokens_decoder();
        let special = (0..vocab as u32)
            .map(|id| added.get(&id).map(|t| t.special).unwrap_or(false))
            .collect();
        Self::finish(inner, bos, eos, stop_ids, add_bos, chat_template, special)
    }

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn dev() -> ModelTokenizer {
        let path = crate::dev_model::require_dev_model().unwrap();
        let mut f = std::fs::File::open(path).unwrap();
        let content = Content::read(&mut f).unwrap();
        ModelTokenizer::from_gguf(&content).unwrap()
    }

    #[test]
    fn round_trips_text() {
        let t = dev();
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
        let t = dev();
        let ids = t.encode("Hello", true).unwrap();
        assert_eq!(ids.len(), 1, "{ids:?}");
        assert_eq!(t.token_text(ids[0]), "Hello");
        let spaced = t.encode(" Hello", true).unwrap();
        assert_ne!(spaced, ids);
    }

    #[test]
    fn special_tokens_and_digits() {
        let t = dev();
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
        let t = dev();
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
