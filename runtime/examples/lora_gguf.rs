//! Writes the tiny `llama` model of `tests/architectures.rs` and the random GGUF LoRA adapters
//! of `tests/lora_gguf.rs` (built by `tests/common/{arch_models,lora_models}.rs`, byte for
//! byte what the test builds) into a directory, with `manifest.json` naming each file, its
//! fingerprint and the prompts (token ids) to run: what `scripts/llama-cpp-greedy.py --lora`
//! gives llama.cpp's `--lora` to record the test's fixture.
//!
//! `cargo run --release -p tollgate-runtime --example lora_gguf -- DIR`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "the test crates' model builders, included as they are"
)]

use anyhow::Context;
use candle_core::quantized::GgmlDType;
use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "../tests/common/arch_models.rs"]
#[allow(dead_code, reason = "the example uses the builders only")]
mod arch_models;

#[path = "../tests/common/lora_models.rs"]
mod lora_models;

use arch_models::{build, fingerprint, prompts, Kind, GREEDY_STEPS};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).context("usage: lora_gguf DIR")?;
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir)?;
    let base = build(Kind::Llama);
    std::fs::write(dir.join("llama.gguf"), &base.gguf)?;
    let shape = lora_models::shape(arch_models::HIDDEN, arch_models::FFN);
    let mut adapters = serde_json::Map::new();
    for (name, adapter, alpha) in lora_models::llama_cpp_adapters() {
        let bytes = lora_models::gguf_adapter(&shape, &adapter, alpha, GgmlDType::F32, &[], &[]);
        let file = format!("{name}.gguf");
        std::fs::write(dir.join(&file), &bytes)?;
        adapters.insert(
            name.into(),
            json!({ "file": file, "fingerprint": fingerprint(&bytes) }),
        );
        eprintln!("wrote {file} ({} bytes)", bytes.len());
    }
    let manifest = json!({
        "greedy_steps": GREEDY_STEPS,
        "base": { "file": "llama.gguf", "fingerprint": fingerprint(&base.gguf) },
        "prompts": prompts(Kind::Llama, base.vocab_size),
        "adapters": adapters,
    });
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?,
    )?;
    println!("{}", dir.display());
    Ok(())
}
