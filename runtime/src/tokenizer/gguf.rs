//! Building a [`ModelTokenizer`] from a GGUF file's metadata: byte-level BPE (vocab and merges,
//! with the pre-tokenizer its `tokenizer.ggml.pre` names) or SentencePiece, control tokens as
//! special tokens, and the special tokens and chat template the file names.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::ModelTokenizer;
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
pub(super) enum PreTokenizer {
    /// GPT-2 byte-level regex only.
    Gpt2,
    /// Every digit on its own, then GPT-2 byte-level (SmolLM, StarCoder).
    DigitsThenGpt2,
    /// A custom split regex, then byte-level without its own regex.
    Regex(&'static str),
}

/// The table of known pre-tokenizer types.
pub(super) fn pre_tokenizer_for(pre: &str) -> Option<PreTokenizer> {
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
}
