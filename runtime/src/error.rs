//! The runtime's error type: everything that can go wrong loading a model or generating text.
//!
//! Messages name the offending value (file, key, token count) so an operator can act on them.
//! Request-path code returns these; nothing in the runtime panics on bad input.

use std::path::PathBuf;

/// Errors of the runtime crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid GGUF file {path}: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("GGUF metadata key `{key}` is missing or has the wrong type")]
    Metadata { key: String },
    #[error("unsupported model architecture `{0}` (supported: llama, qwen2, phi3)")]
    UnsupportedArchitecture(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("device {0}")]
    Device(String),
    #[error("Hugging Face Hub, repo `{repo}`: {message}")]
    Hub { repo: String, message: String },
    /// A LoRA adapter that cannot be applied to its base model (the message names the key or
    /// tensor at fault).
    #[error("LoRA adapter {0}")]
    Adapter(String),
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error(
        "prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the model's context of {context_length} tokens"
    )]
    ContextOverflow {
        prompt_tokens: usize,
        max_tokens: usize,
        context_length: usize,
    },
    #[error("invalid sampling parameter `{param}`: {message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
    /// A response format or tool set that cannot be enforced (`param` locates it).
    #[error("{message}")]
    Constraint { param: String, message: String },
    /// A grammar failed while generating.
    #[error("grammar: {0}")]
    Grammar(String),
    #[error("engine queue is full ({capacity} requests waiting)")]
    QueueFull { capacity: usize },
    #[error("engine has stopped")]
    EngineStopped,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
