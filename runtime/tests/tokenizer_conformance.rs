//! Tokenizer conformance with llama.cpp: every vocabulary Tollgate claims is loaded from
//! llama.cpp's `ggml-vocab-NAME.gguf` with `ModelTokenizer::from_gguf` and must produce exactly
//! the ids of llama.cpp's test vectors (`.gguf.inp`: inputs separated by lines
//! `__ggml_vocab_test__`; `.gguf.out`: one line of ids per input). Like llama.cpp's
//! `test-tokenizer-0`, no BOS is added and special-token text in the input is not matched (none
//! of the vectors contains any). Decoding the ids must give the input back.
//!
//! Fails (never skips) when the files are missing: run `scripts/fetch-vocabs.sh`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use tollgate_runtime::dev_model::require_llama_vocab;
use tollgate_runtime::tokenizer::ModelTokenizer;

/// llama.cpp's test vectors of a vocabulary: `(input, expected ids)`.
fn vectors(gguf: &Path) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| {
        let path = gguf.with_extension(format!("gguf.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let (inp, out) = (read("inp"), read("out"));
    let sep = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find(sep) {
            Some(i) => {
                inputs.push(rest[..i].to_string());
                rest = &rest[i + sep.len()..];
            }
            None => {
                inputs.push(rest.to_string());
                rest = "";
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(inputs.len(), outputs.len(), "{}", gguf.display());
    assert!(!inputs.is_empty());
    inputs.into_iter().zip(outputs).collect()
}

fn tokenizer(name: &str) -> (ModelTokenizer, Vec<(String, Vec<u32>)>) {
    let path = require_llama_vocab(name).expect("run scripts/fetch-vocabs.sh");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let tokenizer = ModelTokenizer::from_gguf(&content)
        .unwrap_or_else(|e| panic!("{name}: from_gguf failed: {e}"));
    (tokenizer, vectors(&path))
}

/// Asserts every vector of `name`; reports each failure before failing.
fn conforms(name: &str) {
    let (tokenizer, vectors) = tokenizer(name);
    let mut failures = Vec::new();
    for (text, expected) in &vectors {
        let ids = tokenizer.encode(text, false).unwrap();
        if &ids != expected {
            failures.push(format!("{text:?}: got {ids:?}, llama.cpp {expected:?}"));
            continue;
        }
        let decoded = tokenizer.decode(&ids, false).unwrap();
        if &decoded != text {
            failures.push(format!("{text:?}: decoded to {decoded:?}"));
        }
    }
    eprintln!(
        "{name}: {}/{} vectors pass",
        vectors.len() - failures.len(),
        vectors.len()
    );
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

#[test]
fn llama_bpe() {
    conforms("llama-bpe");
}

#[test]
fn gpt_2() {
    conforms("gpt-2");
}

#[test]
fn qwen2() {
    conforms("qwen2");
}

#[test]
fn llama_spm() {
    conforms("llama-spm");
}

#[test]
fn phi_3() {
    conforms("phi-3");
}

/// A pre-tokenizer Tollgate does not implement is refused at load, by name.
#[test]
fn unsupported_pre_tokenizers_are_refused_by_name() {
    for name in ["deepseek-llm", "command-r"] {
        let path = require_llama_vocab(name).expect("run scripts/fetch-vocabs.sh");
        let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        let pre = content.metadata["tokenizer.ggml.pre"]
            .to_string()
            .unwrap()
            .clone();
        let err = ModelTokenizer::from_gguf(&content).unwrap_err().to_string();
        assert!(err.contains(&format!("`{pre}`")), "{name}: {err}");
    }
}

/// Stop tokens come from the family: Llama 3 ends a turn with <|eot_id|> whatever the file's
/// metadata names (its EOS here is <|end_of_text|>); Phi-3 with <|end|>; Llama 2 with </s>.
/// (llama.cpp's llama-bpe vocabulary is Llama 3.0's: its id 128008, Llama 3.1's <|eom_id|>, is
/// still a reserved token, so the <|eom_id|> rule is not exercised by these files.)
#[test]
fn stop_tokens_come_from_the_family() {
    let stops = |name: &str| -> Vec<String> {
        let (tokenizer, _) = tokenizer(name);
        tokenizer
            .stop_token_ids()
            .iter()
            .map(|&id| tokenizer.inner().id_to_token(id).unwrap())
            .collect()
    };
    assert_eq!(stops("llama-bpe"), ["<|end_of_text|>", "<|eot_id|>"]);
    assert!(
        stops("phi-3").iter().any(|s| s == "<|end|>"),
        "{:?}",
        stops("phi-3")
    );
    assert_eq!(stops("llama-spm"), ["</s>"]);
}
