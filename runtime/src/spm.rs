//! SentencePiece vocabularies of GGUF files (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral
//! v0.1, Phi-3) as a `tokenizers` BPE model that tokenizes like llama.cpp's SPM tokenizer.
//!
//! llama.cpp's SPM tokenizer prefixes the text with a space (`add_space_prefix`, default on),
//! writes spaces as `▁`, starts from one symbol per character and repeatedly joins the adjacent
//! pair whose concatenation is the vocabulary token of highest score (ties: leftmost); a
//! character no token covers becomes its UTF-8 bytes as `<0xXX>` tokens. A BPE whose merge list
//! holds every pair `(a, b)` of tokens whose concatenation is a token, ranked by that token's
//! score, picks the same joins in the same order (its ties are the leftmost too), and byte
//! fallback gives the same bytes. The normalizer does the prefix and the `▁`.
//!
//! It owns that construction and the raw bytes of each token; `tokenizer` owns the rest.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{DecoderWrapper, NormalizerWrapper, Tokenizer};

use crate::{Error, Result};

/// GGUF token type of byte tokens (`<0xXX>`).
pub(crate) const BYTE_TOKEN: i32 = 6;

/// Builds the tokenizer from the GGUF's tokens, scores and token types.
pub(crate) fn tokenizer(
    tokens: &[String],
    scores: &[f32],
    token_types: &[i32],
    unk: Option<&str>,
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    if scores.len() != tokens.len() {
        return Err(Error::Tokenizer(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    // Every split of every token into two tokens is a merge, ranked by the token's score.
    let mut merges: Vec<(f32, usize, String, String)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if token_types.get(id) == Some(&BYTE_TOKEN) {
            continue;
        }
        for (at, _) in token.char_indices().skip(1) {
            let (a, b) = token.split_at(at);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                merges.push((scores[id], id, a.to_string(), b.to_string()));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges = merges.into_iter().map(|(_, _, a, b)| (a, b)).collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.to_string());
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::Tokenizer(format!("cannot build the SentencePiece BPE: {e}")))?;
    let mut inner = Tokenizer::new(bpe);
    let replace = Replace::new(" ", "▁")
        .map_err(|e| Error::Tokenizer(format!("cannot build the normalizer: {e}")))?;
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(replace.into());
    inner
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| Error::Tokenizer(format!("cannot set the normalizer: {e}")))?;
    let replace = Replace::new("▁", " ")
        .map_err(|e| Error::Tokenizer(format!("cannot build the decoder: {e}")))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// The bytes a token stands for: `<0xXX>` byte tokens their byte, others their text with `▁`
/// as a space.
pub(crate) fn token_bytes(piece: &str, token_type: i32) -> Vec<u8> {
    if token_type == BYTE_TOKEN {
        if let Some(hex) = piece
            .strip_prefix("<0x")
            .and_then(|rest| rest.strip_suffix('>'))
        {
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                return vec![byte];
            }
        }
    }
    piece.replace('▁', " ").into_bytes()
}
