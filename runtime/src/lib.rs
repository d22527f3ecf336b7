//! Tollgate's model runtime: loads Llama-family models (GGUF or safetensors) with candle, builds
//! their tokenizer and chat template from the model itself, samples tokens, and runs the
//! continuous-batching engine that the gateway talks to.
//!
//! It knows nothing of HTTP, customers or billing; the `tollgate` binary adapts it to the
//! gateway's backend trait.

pub mod chat_template;
pub mod classes;
pub mod constraint;
pub mod detokenize;
pub mod dev_model;
pub mod device;
pub mod engine;
pub mod error;
pub mod fair;
pub mod gguf;
pub mod loader;
pub mod model;
pub mod sampling;
mod spm;
pub mod stop;
pub mod synth;
pub mod tokenizer;
pub mod tools;

pub use error::{Error, Result};
