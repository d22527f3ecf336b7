//! Constrained decoding: a grammar decides, token by token, which tokens may come next, so
//! structured outputs (JSON, JSON Schema, tool calls) hold by construction rather than by hope.
//!
//! Built on llguidance (the structured-generation engine behind llama.cpp's and mistral.rs's
//! structured outputs): [`ConstraintCompiler`] turns a [`Grammar`] into a per-sequence
//! [`Constraint`] over the model's own tokenizer; the engine asks it for the allowed tokens
//! before each sample and tells it the token it chose. Schemas that use something llguidance
//! cannot enforce are refused here, with the JSON path of the offending keyword, never relaxed.
//!
//! It owns grammars and masks only; which grammar a request needs (response formats, tool
//! calls) is decided by [`crate::tools`] and the caller.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::tokenizer::ModelTokenizer;
use crate::{Error, Result};

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Exactly one JSON object.
    JsonObject,
    /// JSON valid against this schema (`param` locates it in the request, for errors).
    JsonSchema { schema: Value, param: String },
    /// A Lark grammar in llguidance's dialect (tool calls).
    Lark(String),
}

/// Separators of generated JSON: Python's `json.dumps` style and no other free whitespace, so a
/// small model cannot loop on blanks (llguidance's flexible whitespace allows any amount).
fn json_options() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// A schema with Tollgate's JSON formatting options attached (llguidance reads them from the
/// top-level `x-guidance` key).
pub fn with_json_options(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut map = map.clone();
            map.insert("x-guidance".into(), json_options());
            Value::Object(map)
        }
        // `true` (anything): still an object, formatted as above.
        Value::Bool(true) => json!({"type": "object", "x-guidance": json_options()}),
        other => other.clone(),
    }
}

/// JSON Schema keywords llguidance cannot enforce. A schema using any of them is refused.
const UNSUPPORTED: &[&str] = &[
    "contains",
    "minContains",
    "maxContains",
    "uniqueItems",
    "not",
    "if",
    "then",
    "else",
    "dependentSchemas",
    "dependentRequired",
    "dependencies",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "$dynamicRef",
    "$recursiveRef",
];

/// Keywords whose value is a schema.
const SUBSCHEMA: &[&str] = &["items", "additionalProperties", "additionalItems"];
/// Keywords whose value is a map of schemas.
const SCHEMA_MAPS: &[&str] = &["properties", "patternProperties", "$defs", "definitions"];
/// Keywords whose value is a list of schemas.
const SCHEMA_LISTS: &[&str] = &["anyOf", "oneOf", "allOf", "prefixItems"];

/// Checks a JSON Schema for keywords that cannot be enforced and for references outside the
/// document; `param` is the schema's path in the request. The error names the exact path.
pub fn check_schema(schema: &Value, param: &str) -> Result<()> {
    let Value::Object(map) = schema else {
        return match schema {
            Value::Bool(_) => Ok(()),
            _ => Err(Error::Constraint {
                param: param.to_string(),
                message: format!("a JSON Schema must be an object or a boolean - '{param}'"),
            }),
        };
    };
    for (key, value) in map {
        let here = format!("{param}.{key}");
        if UNSUPPORTED.contains(&key.as_str()) {
            return Err(Error::Constraint {
                message: format!(
                    "the JSON Schema keyword `{key}` cannot be enforced by constrained decoding; remove it - '{here}'"
                ),
                param: here,
            });
        }
        if key == "$ref" {
            match value.as_str() {
                Some(r) if r.starts_with("#") => {}
                _ => {
                    return Err(Error::Constraint {
                        message: format!(
                            "only references inside the schema (`#/...`) are supported, not {value} - '{here}'"
                        ),
                        param: here,
                    })
                }
            }
        } else if SUBSCHEMA.contains(&key.as_str()) {
            match value {
                // A list of item schemas is the older tuple form.
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        check_schema(item, &format!("{here}.[{i}]"))?;
                    }
                }
                _ => check_schema(value, &here)?,
            }
        } else if SCHEMA_MAPS.contains(&key.as_str()) {
            if let Value::Object(entries) = value {
                for (name, sub) in entries {
                    check_schema(sub, &format!("{here}.{name}"))?;
                }
            }
        } else if SCHEMA_LISTS.contains(&key.as_str()) {
            if let Value::Array(items) = value {
                for (i, item) in items.iter().enumerate() {
                    check_schema(item, &format!("{here}.[{i}]"))?;
                }
            }
        }
    }
    Ok(())
}

/// The model's vocabulary as llguidance sees it: every token's bytes, control tokens marked.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<ModelTokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Grammar literals are text; invalid UTF-8 cannot come from a grammar we build.
        self.tokenizer
            .encode(&String::from_utf8_lossy(s), false)
            .unwrap_or_default()
    }
}

/// The token classes llguidance allows wholesale when a JSON string may take them, instead of
/// walking the token trie: its own (any string characters; up to 10; up to 30), and shorter
/// runs for the end of a string with `maxLength`, where the remaining length admits only
/// short tokens. Measured with `cargo run --release -p tollgate-runtime --example structured`:
/// along the benchmark's outputs (strings of at most 24 and 40 characters) the trie nodes
/// walked per mask fall by half in total and by a quarter at the 99th percentile.
fn slices() -> Vec<String> {
    let mut slices = llguidance::earley::SlicedBiasComputer::json_slices();
    for max in [2, 4, 6, 8, 15, 20, 25] {
        slices.push(format!(r#"[^"\\\x00-\x1F\x7F]{{1,{max}}}"#));
    }
    slices
}

/// Compiles grammars for one model; shared by all its requests.
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
    tokenizer: Arc<ModelTokenizer>,
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintCompiler").finish_non_exhaustive()
    }
}

impl ConstraintCompiler {
    /// Builds the token trie of `tokenizer` for logits of `logits_dim` entries (extra rows
    /// past the vocabulary can never be chosen).
    pub fn new(tokenizer: Arc<ModelTokenizer>, logits_dim: usize) -> Result<Self> {
        let vocab = tokenizer.vocab_size().max(logits_dim);
        let words: Vec<Vec<u8>> = (0..vocab)
            .map(|id| {
                let id = id as u32;
                if (id as usize) >= tokenizer.vocab_size() {
                    // A logits row no token has: a special token no grammar names.
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(format!("<[{id}]>").as_bytes());
                    return w;
                }
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_special(id) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(&bytes);
                    w
                } else {
                    bytes
                }
            })
            .collect();
        let stops = tokenizer.stop_token_ids().to_vec();
        let eos = stops
            .first()
            .copied()
            .ok_or_else(|| Error::Tokenizer("the model has no end token".into()))?;
        let info = TokRxInfo::new(vocab as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&stops);
        let env: TokEnv = Arc::new(Vocabulary {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let slices = slices();
        let mut factory = ParserFactory::new(&env, Default::default(), &slices)
            .map_err(|e| Error::Tokenizer(format!("cannot build the grammar vocabulary: {e}")))?;
        factory.set_stderr_log_level(0);
        factory.limits_mut().verbose_errors = false;
        Ok(Self {
            factory: Arc::new(factory),
            tokenizer,
        })
    }

    /// Whether `text` is one control token of this vocabulary (Lark grammars must name such
    /// tokens as `<name>`, not as quoted text).
    pub fn is_special_token(&self, text: &str) -> bool {
        match self.tokenizer.encode(text, false) {
            Ok(ids) => ids.len() == 1 && self.tokenizer.is_special(ids[0]),
            Err(_) => false,
        }
    }

    /// A fresh constraint for one sequence. A grammar or schema that cannot be compiled is an
    /// [`Error::Constraint`] with the llguidance message.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint> {
        let (top, param) = match grammar {
            Grammar::JsonObject => (
                TopLevelGrammar::from_json_schema(with_json_options(&json!({"type": "object"}))),
                "response_format".to_string(),
            ),
            Grammar::JsonSchema { schema, param } => {
                check_schema(schema, param)?;
                (
                    TopLevelGrammar::from_json_schema(with_json_options(schema)),
                    param.clone(),
                )
            }
            Grammar::Lark(source) => (
                TopLevelGrammar::from_lark(source.clone()),
                "tools".to_string(),
            ),
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| Error::Constraint {
                message: format!("{e} - '{param}'"),
                param: param.clone(),
            })?;
        let mut matcher = Matcher::new(Ok(parser));
        // The first mask costs the most (the lexer starts cold and the grammar's fixed prefix
        // is forced): computed here, on the request's thread, rather than in an engine step
        // that the whole batch waits for.
        let first = matcher.compute_mask().map_err(|e| Error::Constraint {
            message: format!("{e} - '{param}'"),
            param,
        })?;
        Ok(Constraint {
            matcher,
            first: Some(first),
        })
    }
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The mask of the state the constraint was compiled in, until the first token.
    first: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets the logits of every token the grammar does not allow next to −∞. When the grammar
    /// is complete only the end tokens remain.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = match self.first.take() {
            Some(first) => first,
            None => self
                .matcher
                .compute_mask()
                .map_err(|e| Error::Grammar(e.to_string()))?,
        };
        // 32 tokens per word: whole words allowed or forbidden are the common case.
        let words = allowed.as_slice();
        for (k, chunk) in logits.chunks_mut(32).enumerate() {
            let word = words.get(k).copied().unwrap_or(0);
            if word == u32::MAX {
                continue;
            }
            if word == 0 {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            for (bit, l) in chunk.iter_mut().enumerate() {
                // Branch-free, so that mixed words (the common case inside strings) vectorize.
                *l = if word >> bit & 1 == 1 {
                    *l
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        Ok(())
    }

    /// Advances the grammar by the chosen token.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.first = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| Error::Grammar(e.to_string()))
    }

    /// Advances the grammar by tokens already generated (a constraint that starts late).
    pub fn commit_all(&mut self, tokens: &[u32]) -> Result<()> {
        self.first = None;
        self.matcher
            .consume_tokens(tokens)
            .map_err(|e| Error::Grammar(e.to_string()))
    }

    /// Token-trie nodes the last mask walked: the part of its cost that does not depend on
    /// the machine (the benchmark prints it beside the times).
    pub fn last_mask_nodes_walked(&self) -> usize {
        self.matcher
            .last_step_stats()
            .map(|s| s.trie_nodes_walked)
            .unwrap_or_default()
    }

    /// Whether the grammar can take no more tokens (the output is complete).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(schema: Value) -> Option<String> {
        match check_schema(&schema, "s") {
            Ok(()) => None,
            Err(Error::Constraint { param, .. }) => Some(param),
            Err(other) => Some(format!("unexpected {other}")),
        }
    }

    #[test]
    fn unenforceable_keywords_are_found_where_they_are() {
        assert_eq!(param_of(json!({"type": "object"})), None);
        assert_eq!(
            param_of(json!({"properties": {"a": {"type": "array", "uniqueItems": true}}})),
            Some("s.properties.a.uniqueItems".into())
        );
        assert_eq!(
            param_of(json!({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]})),
            Some("s.anyOf.[1].not".into())
        );
        assert_eq!(
            param_of(json!({"$defs": {"X": {"type": "array", "items": {"contains": {}}}}})),
            Some("s.$defs.X.items.contains".into())
        );
        assert_eq!(
            param_of(json!({"$ref": "https://example.com/schema.json"})),
            Some("s.$ref".into())
        );
        assert_eq!(param_of(json!({"$ref": "#/$defs/X"})), None);
        // Names of properties are not keywords.
        assert_eq!(
            param_of(json!({"properties": {"not": {"type": "string"}}})),
            None
        );
        assert_eq!(param_of(json!(3)), Some("s".into()));
    }

    #[test]
    fn formatting_options_are_attached() {
        let s = with_json_options(&json!({"type": "object"}));
        assert_eq!(s["x-guidance"]["whitespace_flexible"], json!(false));
        assert_eq!(s["type"], json!("object"));
    }
}
