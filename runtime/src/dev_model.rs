//! Where the development model (SmolLM2-135M-Instruct Q4_1 GGUF) lives, for tests and benches.
//!
//! `scripts/fetch-model.sh` puts it in `models/`; `TOLLGATE_TEST_MODEL` overrides the path.
//! Tests that need it fail (never skip) when it is absent, saying how to fetch it. The same holds
//! for llama.cpp's tokenizer test vocabularies (`scripts/fetch-vocabs.sh`). It only finds files
//! (the modules it serves import it, so it imports none of them); [`crate::loader::load_dev_model`]
//! loads the model.

use std::path::PathBuf;

/// File name of the development model inside `models/`.
pub const DEV_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Path of the development model: `$TOLLGATE_TEST_MODEL`, else `<repo>/models/<file>`, the
/// repository found from `CARGO_MANIFEST_DIR` as cargo sets it when running the test or
/// example (a build cache shared between clones keeps the compile-time value of the clone
/// that built it), else as it was at compile time.
pub fn dev_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_TEST_MODEL") {
        return PathBuf::from(p);
    }
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
        .join("models")
        .join(DEV_MODEL_FILE)
}

/// Like [`dev_model_path`], but an error telling how to fetch the model when it is missing.
pub fn require_dev_model() -> crate::Result<PathBuf> {
    required(dev_model_path(), "development model", "fetch-model.sh")
}

/// Directory of llama.cpp's tokenizer test vocabularies (`ggml-vocab-NAME.gguf` with their
/// `.gguf.inp`/`.gguf.out` vectors): `$TOLLGATE_VOCAB_DIR`, else
/// `${XDG_CACHE_HOME:-~/.cache}/tollgate/llama-vocabs`, where `scripts/fetch-vocabs.sh` puts them.
pub fn llama_vocab_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_VOCAB_DIR") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("tollgate").join("llama-vocabs")
}

/// Path of `ggml-vocab-{name}.gguf`, or an error telling how to fetch it when it is missing.
pub fn require_llama_vocab(name: &str) -> crate::Result<PathBuf> {
    let path = llama_vocab_dir().join(format!("ggml-vocab-{name}.gguf"));
    required(path, "llama.cpp vocabulary", "fetch-vocabs.sh")
}

/// `path` when it is a file, else an error naming `what` is missing and the script that
/// fetches it.
fn required(path: PathBuf, what: &str, script: &str) -> crate::Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(crate::Error::Config(format!(
            "{what} not found at {}; run `scripts/{script}` first",
            path.display()
        )))
    }
}
