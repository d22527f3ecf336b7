//! The grammar compiler of a local model, built off the load's path. Its vocabulary (a trie
//! of every token's bytes) took a third of an on-demand load of a 128k-vocabulary model (1.2
//! to 1.7 s of 4.2 to 4.9 s on a loaded machine, bench/coldload.py), and most requests never
//! use it: it is built on a thread of its own once the engine has started, so the model
//! serves as soon as its weights are in, and a request with `response_format` or `tools`
//! that comes first waits for it (off the async threads).

use std::sync::{Arc, OnceLock};

use tollgate_runtime::constraint::ConstraintCompiler;
use tollgate_runtime::tokenizer::ModelTokenizer;
use tollgate_runtime::Error as RuntimeError;

/// A compiler built once, in the background or by the first request that needs it.
pub struct Grammars {
    tokenizer: Arc<ModelTokenizer>,
    logits_dim: usize,
    /// The compiler, or why it could not be built (a model without an end token).
    compiler: OnceLock<Result<Arc<ConstraintCompiler>, String>>,
}

impl Grammars {
    /// Starts building the compiler for `tokenizer` and `logits_dim` logits on a thread of its
    /// own (when no thread can be started, the first request that needs it builds it).
    pub fn start(tokenizer: Arc<ModelTokenizer>, logits_dim: usize) -> Arc<Self> {
        let grammars = Arc::new(Self {
            tokenizer,
            logits_dim,
            compiler: OnceLock::new(),
        });
        let building = grammars.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("tollgate-grammars".into())
            .spawn(move || {
                let _ = building.compiler();
            })
        {
            tracing::warn!("grammar compiler built on first use: {e}");
        }
        grammars
    }

    /// The compiler, built now if it is not yet (blocking: call it off the async threads).
    pub fn compiler(&self) -> Result<Arc<ConstraintCompiler>, RuntimeError> {
        self.compiler
            .get_or_init(|| {
                ConstraintCompiler::new(self.tokenizer.clone(), self.logits_dim)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(RuntimeError::Tokenizer)
    }
}
