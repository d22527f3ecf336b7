//! Load time and memory of a Llama-3.2-1B-shaped model (1.24B parameters, 128k context, tied
//! embeddings, llama-bpe vocabulary) with random weights, written as GGUF at first run.
//!
//! ```text
//! cargo run --release -p tollgate-runtime --example large_model -- [q8_0|q4_0] [auto|native ...]
//! ```
//!
//! The file goes to `$TMPDIR/tollgate-large-llama-<type>.gguf` and is kept for later runs
//! (`--fresh` rewrites it). Each weight form is measured in a fresh child process, after the
//! file has been read once so that it loads from the page cache: load seconds, GB/s, peak RSS
//! (VmHWM) and its ratio to the file size. Needs the llama-bpe vocabulary
//! (`scripts/fetch-vocabs.sh`).

use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use tollgate_runtime::dev_model::require_llama_vocab;
use tollgate_runtime::loader::{self, LoadOptions, ModelSource};
use tollgate_runtime::model::WeightForm;
use tollgate_runtime::synth::{write_gguf, LlamaShape};

/// Llama 3's chat template, short form (the loader compiles and trial-renders it).
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--measure") {
        let (Some(path), Some(form)) = (args.get(1), args.get(2)) else {
            bail!("usage: --measure PATH FORM");
        };
        return measure(Path::new(path), form.parse()?);
    }
    let fresh = args.iter().any(|a| a == "--fresh");
    let kind = args
        .iter()
        .find(|a| matches!(a.as_str(), "q8_0" | "q4_0"))
        .map_or("q8_0", String::as_str);
    let forms: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| a.parse::<WeightForm>().is_ok() && !matches!(*a, "q8_0"))
        .collect();
    let forms = if forms.is_empty() {
        vec!["native", "auto"]
    } else {
        forms
    };
    let dtype = if kind == "q4_0" {
        GgmlDType::Q4_0
    } else {
        GgmlDType::Q8_0
    };
    let path = std::env::temp_dir().join(format!("tollgate-large-llama-{kind}.gguf"));
    if fresh || !path.is_file() {
        write(&path, dtype)?;
    }
    let size = std::fs::metadata(&path)?.len();
    println!("file {} ({:.3} GB)", path.display(), size as f64 / 1e9);
    for form in forms {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--measure", &path.to_string_lossy(), form])
            .output()?;
        if !out.status.success() {
            bail!(
                "measuring `{form}` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

fn write(path: &PathBuf, dtype: GgmlDType) -> anyhow::Result<()> {
    let vocab_path = require_llama_vocab("llama-bpe")?;
    let vocab = Content::read(&mut std::fs::File::open(&vocab_path)?)?;
    let shape = LlamaShape::llama32_1b();
    let mut metadata = shape.metadata();
    metadata.extend(
        vocab
            .metadata
            .into_iter()
            .filter(|(k, _)| k.starts_with("tokenizer.") && k != "tokenizer.chat_template"),
    );
    metadata.push((
        "tokenizer.chat_template".into(),
        candle_core::quantized::gguf_file::Value::String(TEMPLATE.into()),
    ));
    let started = Instant::now();
    let tmp = path.with_extension("partial");
    let mut file = BufWriter::new(std::fs::File::create(&tmp)?);
    let bytes = write_gguf(&mut file, &metadata, &shape.tensors(dtype))?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    println!(
        "wrote {} parameters ({dtype:?}), {:.3} GB in {:.1} s",
        shape.parameters(),
        bytes as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `VmRSS`/`VmHWM` of this process in bytes.
fn status_kb(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?;
    Ok(kb * 1024)
}

fn measure(path: &Path, form: WeightForm) -> anyhow::Result<()> {
    // Into the page cache first, through a small buffer (not counted in this process's RSS).
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while file.read(&mut buf)? > 0 {}
    drop(buf);
    let size = std::fs::metadata(path)?.len() as f64;
    let before = status_kb("VmRSS:")?;
    let started = Instant::now();
    let loaded = loader::load(
        "large",
        &ModelSource::Path(path.to_path_buf()),
        &LoadOptions::cpu(form),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = status_kb("VmHWM:")?;
    let after = status_kb("VmRSS:")?;
    println!(
        "{form:>6}: load {seconds:.2} s = {:.2} GB/s; RSS before {:.0} MB, after {:.3} GB ({:.3}x the file), peak {:.3} GB ({:.3}x)",
        size / seconds / 1e9,
        before as f64 / 1e6,
        after as f64 / 1e9,
        after as f64 / size,
        peak as f64 / 1e9,
        peak as f64 / size,
    );
    drop(loaded);
    // Where the time goes: the header and the tokenizer, timed again on their own.
    let started = Instant::now();
    let content = tollgate_runtime::gguf::read_content(&mut std::fs::File::open(path)?)
        .map_err(anyhow::Error::msg)?;
    let header = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let tokenizer = tollgate_runtime::tokenizer::ModelTokenizer::from_gguf(&content)?;
    let tokenizer_seconds = started.elapsed().as_secs_f64();
    drop(tokenizer);
    println!(
        "        of which header {header:.2} s, tokenizer {tokenizer_seconds:.2} s, weights and template {:.2} s",
        seconds - header - tokenizer_seconds
    );
    Ok(())
}
