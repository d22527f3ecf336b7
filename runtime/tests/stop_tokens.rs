//! Llama 3.1's `<|eom_id|>` (end of message: the model stops to let a tool run) ends
//! generation like `<|eot_id|>`, found by its id in the GGUF metadata
//! (`tokenizer.ggml.eom_token_id`) whatever the token is called, or by its name when the
//! metadata says nothing. Checked on a small Llama-shaped model built here, and in the engine:
//! the token a random model picks greedily is declared the end-of-message token, and
//! generation then stops right there.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::path::{Path, PathBuf};

use tokio::sync::mpsc::UnboundedReceiver;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use tollgate_runtime::engine::{Engine, EngineConfig, GenEvent, GenRequest, StopReason};
use tollgate_runtime::loader::{load, LoadOptions, ModelSource};
use tollgate_runtime::model::WeightForm;
use tollgate_runtime::sampling::SamplingParams;
use tollgate_runtime::synth::{byte_vocab, gguf_bytes, LlamaShape};
use tollgate_runtime::tokenizer::ModelTokenizer;

const TEMPLATE: &str = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
/// Ids of the specials: 256 + index.
const SPECIALS: [&str; 5] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|reserved_special_token_2|>",
    "<|python_tag|>",
];
const EOT: u32 = 258;
const RESERVED: u32 = 259;

/// A GGUF with the special tokens `specials` and, when given, `tokenizer.ggml.eom_token_id`.
fn model_file(specials: &[&str], eom: Option<u32>) -> Vec<u8> {
    let shape = LlamaShape {
        vocab: 256 + specials.len(),
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 1,
        ffn: 128,
        context: 4096,
        rope_theta: 500_000.0,
        tied: true,
    };
    let mut metadata = shape.metadata();
    metadata.extend(byte_vocab(specials, 0, 1, TEMPLATE));
    if let Some(id) = eom {
        metadata.push(("tokenizer.ggml.eom_token_id".into(), Value::U32(id)));
    }
    gguf_bytes(&metadata, &shape.tensors(GgmlDType::Q8_0)).unwrap()
}

fn tokenizer(bytes: &[u8]) -> ModelTokenizer {
    let content = Content::read(&mut std::io::Cursor::new(bytes)).unwrap();
    ModelTokenizer::from_gguf(&content).unwrap()
}

#[test]
fn eom_is_a_stop_by_metadata_id_or_by_name() {
    // By id: the token at `eom_token_id` stops, whatever its name.
    let t = tokenizer(&model_file(&SPECIALS, Some(RESERVED)));
    assert!(
        t.stop_token_ids().contains(&RESERVED),
        "{:?}",
        t.stop_token_ids()
    );
    assert!(t.stop_token_ids().contains(&EOT));
    // Without the metadata the reserved token is just a token.
    let t = tokenizer(&model_file(&SPECIALS, None));
    assert!(
        !t.stop_token_ids().contains(&RESERVED),
        "{:?}",
        t.stop_token_ids()
    );
    // By name: Llama 3.1's vocabulary calls it `<|eom_id|>`.
    let mut named = SPECIALS;
    named[3] = "<|eom_id|>";
    let t = tokenizer(&model_file(&named, None));
    assert!(
        t.stop_token_ids().contains(&RESERVED),
        "{:?}",
        t.stop_token_ids()
    );
    // A plain (non-special) token named by the metadata stops as well.
    let t = tokenizer(&model_file(&SPECIALS, Some(u32::from(b'A'))));
    assert!(t.stop_token_ids().contains(&u32::from(b'A')));
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

fn engine(bytes: &[u8], tag: &str) -> (Engine, TempFile) {
    let path = std::env::temp_dir().join(format!("tollgate-eom-{}-{tag}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let file = TempFile(path);
    let loaded = load(
        "eom",
        &ModelSource::Path(Path::new(&file.0).to_path_buf()),
        &LoadOptions::cpu(WeightForm::Auto),
    )
    .unwrap();
    let engine = Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default()).unwrap();
    (engine, file)
}

/// Submits a greedy generation that reports each token's log-probability.
fn submit_greedy(
    engine: &Engine,
    prompt: &[u32],
    max_tokens: usize,
) -> UnboundedReceiver<GenEvent> {
    let sampling = SamplingParams {
        temperature: 0.0,
        logprobs: Some(1),
        ..SamplingParams::default()
    };
    engine
        .submit(GenRequest::new(prompt.to_vec(), max_tokens, sampling))
        .unwrap()
}

/// Greedy generation: the tokens' count and why it stopped.
fn generate(engine: &Engine, prompt: &[u32], max_tokens: usize) -> (usize, StopReason) {
    let mut events = submit_greedy(engine, prompt, max_tokens);
    while let Some(event) = events.blocking_recv() {
        match event {
            GenEvent::Admitted | GenEvent::Delta { .. } => {}
            GenEvent::Finished {
                reason,
                completion_tokens,
                ..
            } => return (completion_tokens, reason),
            GenEvent::Failed { message } => panic!("generation failed: {message}"),
        }
    }
    panic!("the engine stopped without finishing");
}

/// The first token the model picks greedily after `prompt`.
fn first_token(engine: &Engine, prompt: &[u32]) -> u32 {
    let mut events = submit_greedy(engine, prompt, 1);
    while let Some(event) = events.blocking_recv() {
        if let GenEvent::Delta { logprobs, .. } = event {
            if let Some(first) = logprobs.first() {
                // Byte tokens have the byte's id; specials follow them.
                let bytes = &first.chosen.bytes;
                if let [b] = bytes.as_slice() {
                    return u32::from(*b);
                }
                let name = String::from_utf8_lossy(bytes);
                let i = SPECIALS.iter().position(|s| *s == name).unwrap();
                return 256 + i as u32;
            }
        }
    }
    panic!("no token");
}

#[test]
fn generation_stops_at_the_metadata_eom_token() {
    let prompt: Vec<u32> = "Call the tool.".bytes().map(u32::from).collect();
    let (free, _file) = engine(&model_file(&SPECIALS, None), "free");
    let (n, reason) = generate(&free, &prompt, 6);
    assert_eq!(
        (n, reason),
        (6, StopReason::Length),
        "the control run must not stop early"
    );
    let token = first_token(&free, &prompt);
    // Declared as the end of message, the same token ends generation at once.
    let (eom, _file) = engine(&model_file(&SPECIALS, Some(token)), "eom");
    let (n, reason) = generate(&eom, &prompt, 6);
    assert_eq!((n, reason), (1, StopReason::Stop), "eom token {token}");
}
