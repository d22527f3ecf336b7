//! Building a [`ModelTokenizer`] from a model directory: `tokenizer.json`, with the special
//! tokens and chat template of `tokenizer_config.json` and the end tokens of
//! `generation_config.json`.

use std::path::Path;

use tokenizers::Tokenizer;

use super::ModelTokenizer;
use crate::{Error, Result};

impl ModelTokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", cfg_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(source) => {
                return Err(Error::Io {
                    path: cfg_path,
                    source,
                })
            }
        };
        // Special tokens are strings or {"content": ...} objects.
        let token_of = |key: &str| -> Option<(u32, String)> {
            let v = cfg.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            Some((inner.token_to_id(s)?, s.to_string()))
        };
        let bos = token_of("bos_token");
        let eos = token_of("eos_token");
        let mut stop_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        // generation_config.json may name more end tokens (Llama 3: <|eot_id|>).
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
            if let Ok(gen) = serde_json::from_str::<serde_json::Value>(&text) {
                match gen.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => {
                        stop_ids.extend(n.as_u64().and_then(|n| u32::try_from(n).ok()))
                    }
                    Some(serde_json::Value::Array(a)) => stop_ids.extend(
                        a.iter()
                            .filter_map(|n| n.as_u64().and_then(|n| u32::try_from(n).ok())),
                    ),
                    _ => {}
                }
            }
        }
        for name in ["<|eot_id|>", "<|im_end|>", "<|end_of_text|>"] {
            if let Some(id) = inner.token_to_id(name) {
                if eos.as_ref().map(|(e, _)| *e) == Some(id) || name == "<|eot_id|>" {
                    stop_ids.push(id);
                }
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let vocab = inner.get_vocab_size(true);
        let added = inner.get_added_tokens_decoder();
        let special = (0..vocab as u32)
            .map(|id| added.get(&id).map(|t| t.special).unwrap_or(false))
            .collect();
        Self::finish(inner, bos, eos, stop_ids, add_bos, chat_template, special)
    }
}
