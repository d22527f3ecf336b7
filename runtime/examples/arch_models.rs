//! Writes the tiny random models of `tests/architectures.rs` (`qwen2`, `phi3`, `llama`; built
//! by `tests/common/arch_models.rs`, byte for byte what the tests build) into a directory,
//! with `manifest.json` naming each file, its fingerprint and the prompts (token ids) to run:
//! what `scripts/llama-cpp-greedy.py` gives llama.cpp to record the test's fixture.
//!
//! `cargo run --release -p tollgate-runtime --example arch_models -- DIR`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "the test crates' model builders, included as they are"
)]

use anyhow::Context;
use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "../tests/common/arch_models.rs"]
#[allow(dead_code, reason = "the example uses the builders only")]
mod arch_models;

use arch_models::{build, fingerprint, prompts, Kind, GREEDY_STEPS};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).context("usage: arch_models DIR")?;
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir)?;
    let mut models = serde_json::Map::new();
    for kind in Kind::LLAMA_CPP {
        let model = build(kind);
        let file = format!("{}.gguf", kind.name());
        std::fs::write(dir.join(&file), &model.gguf)?;
        models.insert(
            kind.name().into(),
            json!({
                "file": file,
                "fingerprint": fingerprint(&model.gguf),
                "vocab_size": model.vocab_size,
                "prompts": prompts(kind, model.vocab_size),
            }),
        );
        eprintln!("wrote {file} ({} bytes)", model.gguf.len());
    }
    let manifest = json!({ "greedy_steps": GREEDY_STEPS, "models": models });
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?,
    )?;
    println!("{}", dir.display());
    Ok(())
}
