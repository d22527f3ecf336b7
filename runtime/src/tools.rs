//! Tool calling for models that write calls as text: how the tools are shown to a model whose
//! chat template does not render them, the grammars that make a call valid by construction,
//! and the parser that turns generated text back into calls.
//!
//! The call format is the one SmolLM, Hermes and Qwen models use:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! A forced call (`tool_choice` `required` or a named function) is constrained from the first
//! token; with `auto` the model writes freely and the call is constrained from the moment it
//! writes `<tool_call>` ([`crate::engine::GenConstraint::AfterTrigger`]). Either way the name is
//! one of the offered tools and the arguments validate against its parameters schema.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::constraint::{with_json_options, ConstraintCompiler};

/// The marker that opens a call.
pub const CALL_OPEN: &str = "<tool_call>";
/// The marker that closes a call.
pub const CALL_CLOSE: &str = "</tool_call>";

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

/// Which calls the grammar allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallMode {
    /// At least one call, of any offered tool, and nothing else.
    Required,
    /// Exactly the named tool, and nothing else.
    Named(String),
}

/// The system-prompt text that states the tools to a model whose chat template has no tool
/// support (the documented fallback): the functions as JSON signatures and the call format.
pub fn tools_prompt(tools: &[ToolSpec]) -> String {
    let mut out = String::from(
        "You may call functions to help with the user's request. The functions are listed as JSON inside <tools></tools>:\n<tools>\n",
    );
    for t in tools {
        let sig = json!({
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description.clone().unwrap_or_default(),
                "parameters": t.parameters,
            }
        });
        out.push_str(&sig.to_string());
        out.push('\n');
    }
    out.push_str(
        "</tools>\nTo call a function, answer with one JSON object per call, each inside <tool_call></tool_call>:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <arguments-object>}\n</tool_call>",
    );
    out
}

/// How an earlier assistant call is written back into the conversation for such a model.
pub fn render_call(name: &str, arguments: &str) -> String {
    let arguments: Value =
        serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_string()));
    format!(
        "{CALL_OPEN}\n{}\n{CALL_CLOSE}",
        json!({"name": name, "arguments": arguments})
    )
}

/// How a tool result is written back for such a model.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// The schema of one call: `{"name": <one of the tools>, "arguments": <its parameters>}`.
fn call_schema(tools: &[&ToolSpec]) -> Value {
    let options: Vec<Value> = tools
        .iter()
        .map(|t| {
            let parameters = match &t.parameters {
                Value::Null => json!({"type": "object"}),
                p => p.clone(),
            };
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = if options.len() == 1 {
        options.into_iter().next().unwrap_or(Value::Null)
    } else {
        json!({"anyOf": options})
    };
    with_json_options(&schema)
}

/// A Lark literal: a control token by name where the vocabulary has it as one, else text.
fn literal(compiler: &ConstraintCompiler, text: &str) -> String {
    if compiler.is_special_token(text) {
        text.to_string()
    } else {
        Value::String(text.to_string()).to_string()
    }
}

/// The Lark rules of calls in the format above: `calls` is one `call_block`, or with `parallel`
/// up to one per offered tool (a small model asked for "one or more" calls tends to repeat
/// its call until the token limit; the bound ends the output once every tool could have been
/// called).
fn call_rules(compiler: &ConstraintCompiler, tools: &[&ToolSpec], parallel: bool) -> String {
    let max_calls = if parallel { tools.len().max(1) } else { 1 };
    let mut calls = String::from("call_block");
    for _ in 1..max_calls {
        calls = format!("call_block (\"\\n\"? {calls})?");
    }
    format!(
        "calls: {calls}\ncall_block: {open} \"\\n\"? call \"\\n\"? {close}\ncall: %json {schema}\n",
        open = literal(compiler, CALL_OPEN),
        close = literal(compiler, CALL_CLOSE),
        schema = call_schema(tools),
    )
}

fn offered<'a>(tools: &'a [ToolSpec], mode: Option<&CallMode>) -> Vec<&'a ToolSpec> {
    match mode {
        Some(CallMode::Named(name)) => tools.iter().filter(|t| &t.name == name).collect(),
        _ => tools.iter().collect(),
    }
}

/// The grammar of a forced call: the output is one call (several when `parallel` and the mode
/// is `Required`) and nothing else.
pub fn forced_grammar(
    compiler: &ConstraintCompiler,
    tools: &[ToolSpec],
    mode: &CallMode,
    parallel: bool,
) -> String {
    let tools = offered(tools, Some(mode));
    let parallel = parallel && matches!(mode, CallMode::Required);
    format!("start: calls\n{}", call_rules(compiler, &tools, parallel))
}

/// The grammar that takes over when a model that may choose (`auto`) starts a call: the text it
/// wrote from the start of the token where `<tool_call>` begins (`before`), then calls.
pub fn late_grammar(
    compiler: &ConstraintCompiler,
    tools: &[ToolSpec],
    parallel: bool,
    before: &str,
) -> String {
    let tools = offered(tools, None);
    let prefix = if before.is_empty() {
        String::new()
    } else {
        format!("{} ", Value::String(before.to_string()))
    };
    format!(
        "start: {prefix}calls\n{}",
        call_rules(compiler, &tools, parallel)
    )
}

/// A piece of generated output: text for the message content, or a complete call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// `arguments` is the arguments object as compact JSON text.
    Call {
        name: String,
        arguments: String,
    },
}

#[derive(Deserialize)]
struct RawCall {
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// Splits streamed output into content and calls. Text that may be the start of a call marker
/// is held back until it is known; a call is returned once it is complete. What does not
/// parse as a call (an unfinished one at the end of the output) is returned as text.
#[derive(Debug, Default)]
pub struct CallParser {
    pending: String,
    in_call: bool,
}

impl CallParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds generated text; returns what is now certain.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.pending.find(CALL_CLOSE) else {
                    break;
                };
                let body: String = self.pending[..end].to_string();
                self.pending.drain(..end + CALL_CLOSE.len());
                self.in_call = false;
                match serde_json::from_str::<RawCall>(body.trim()) {
                    Ok(call) => out.push(Piece::Call {
                        name: call.name,
                        arguments: match call.arguments {
                            Value::Null => "{}".to_string(),
                            v => v.to_string(),
                        },
                    }),
                    Err(_) => out.push(Piece::Text(format!("{CALL_OPEN}{body}{CALL_CLOSE}"))),
                }
            } else if let Some(start) = self.pending.find(CALL_OPEN) {
                let before: String = self.pending[..start].to_string();
                if !before.is_empty() {
                    out.push(Piece::Text(before));
                }
                self.pending.drain(..start + CALL_OPEN.len());
                self.in_call = true;
            } else {
                // Keep back the longest tail that could still become the marker.
                let keep = (1..CALL_OPEN.len())
                    .rev()
                    .find(|&k| {
                        self.pending.len() >= k
                            && self.pending.is_char_boundary(self.pending.len() - k)
                            && CALL_OPEN.starts_with(&self.pending[self.pending.len() - k..])
                    })
                    .unwrap_or(0);
                let emit = self.pending.len() - keep;
                if emit > 0 {
                    let text: String = self.pending.drain(..emit).collect();
                    out.push(Piece::Text(text));
                }
                break;
            }
        }
        out
    }

    /// The end of the output: whatever is held back, as text.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.pending);
        let text = if self.in_call {
            format!("{CALL_OPEN}{rest}")
        } else {
            rest
        };
        self.in_call = false;
        if text.is_empty() {
            Vec::new()
        } else {
            vec![Piece::Text(text)]
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run(chunks: &[&str]) -> Vec<Piece> {
        let mut p = CallParser::new();
        let mut out: Vec<Piece> = chunks.iter().flat_map(|c| p.push(c)).collect();
        out.extend(p.finish());
        // Merge adjacent text for comparison.
        let mut merged: Vec<Piece> = Vec::new();
        for piece in out {
            match (merged.last_mut(), piece) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (_, piece) => merged.push(piece),
            }
        }
        merged
    }

    #[test]
    fn calls_split_from_text_across_chunk_boundaries() {
        let whole = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let want = vec![
            Piece::Text("Let me check.\n".into()),
            Piece::Call {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into(),
            },
        ];
        assert_eq!(run(&[whole]), want);
        // Every split point, including inside the markers.
        for cut in 1..whole.len() {
            assert_eq!(run(&[&whole[..cut], &whole[cut..]]), want, "cut at {cut}");
        }
        let chars: Vec<String> = whole.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&refs), want);
    }

    #[test]
    fn plain_text_and_lookalikes_stay_text() {
        assert_eq!(
            run(&["a < b <tool", " c"]),
            vec![Piece::Text("a < b <tool c".into())]
        );
        assert_eq!(
            run(&["<tool_call>{not json"]),
            vec![Piece::Text("<tool_call>{not json".into())]
        );
        assert_eq!(
            run(&["<tool_call>{bad}</tool_call>"]),
            vec![Piece::Text("<tool_call>{bad}</tool_call>".into())]
        );
    }

    #[test]
    fn parallel_calls() {
        let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {\"x\": 1}}\n</tool_call>";
        assert_eq!(
            run(&[text]),
            vec![
                Piece::Call {
                    name: "a".into(),
                    arguments: "{}".into()
                },
                Piece::Text("\n".into()),
                Piece::Call {
                    name: "b".into(),
                    arguments: "{\"x\":1}".into()
                },
            ]
        );
    }

    #[test]
    fn rendered_calls_parse_back() {
        let text = render_call("f", "{\"q\": \"x\"}");
        assert_eq!(
            run(&[&text]),
            vec![Piece::Call {
                name: "f".into(),
                arguments: "{\"q\":\"x\"}".into()
            }]
        );
    }
}
