//! Tool calling for models that write calls as text: how the tools are shown to a model whose
//! chat template does not render them, the grammars that make a call valid by construction,
//! and the parser that turns generated text back into calls, streamed as they are written.
//!
//! Two call syntaxes ([`CallSyntax`]):
//!
//! * **Hermes** (SmolLM, Hermes, Qwen, and the fallback prompt for templates without tools):
//!
//!   ```text
//!   <tool_call>
//!   {"name": "get_weather", "arguments": {"city": "Paris"}}
//!   </tool_call>
//!   ```
//!
//! * **Llama 3.1+ JSON**: the answer is the call, `{"name": "get_weather", "parameters":
//!   {"city": "Paris"}}`, optionally after `<|python_tag|>`, and the turn ends. Meta's templates
//!   render one call per assistant message, so this syntax carries one call per answer.
//!
//! A forced call (`tool_choice` `required` or a named function) is constrained from the first
//! token; with `auto` the model writes freely and the call is constrained from the moment it
//! starts one ([`crate::engine::GenConstraint::AfterTrigger`]): `<tool_call>` anywhere, or for
//! Llama 3 a `{` or `<|python_tag|>` that opens the answer. Either way the name is one of the
//! offered tools and the arguments validate against its parameters schema.

use serde_json::{json, Value};

use crate::constraint::{with_json_options, ConstraintCompiler};
use crate::engine::Trigger;

mod parser;

pub use parser::{CallParser, Piece};

/// The marker that opens a Hermes call.
pub const CALL_OPEN: &str = "<tool_call>";
/// The marker that closes a Hermes call.
pub const CALL_CLOSE: &str = "</tool_call>";
/// The control token Llama 3.1+ may write before a call.
pub const PYTHON_TAG: &str = "<|python_tag|>";

/// How a model writes a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallSyntax {
    /// `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, any number per answer.
    Hermes,
    /// `{"name": …, "parameters": {…}}` as the whole answer, `<|python_tag|>` optional.
    Llama3Json,
}

impl CallSyntax {
    /// The key of the arguments object.
    pub fn arguments_key(self) -> &'static str {
        match self {
            Self::Hermes => "arguments",
            Self::Llama3Json => "parameters",
        }
    }

    /// Where a call the model chose to write (`auto`) begins.
    pub fn triggers(self) -> Vec<Trigger> {
        match self {
            Self::Hermes => vec![Trigger::Anywhere(CALL_OPEN.into())],
            Self::Llama3Json => vec![
                Trigger::AtStart(PYTHON_TAG.into()),
                Trigger::AtStart("{".into()),
            ],
        }
    }
}

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

/// The schema of one call: `{"name": <one of the tools>, <arguments key>: <its parameters>}`.
/// llguidance writes properties in schema order, so the name always comes first (the parser
/// streams the arguments because of that).
fn call_schema(syntax: CallSyntax, tools: &[&ToolSpec]) -> Value {
    let options: Vec<Value> = tools
        .iter()
        .map(|t| {
            let parameters = match &t.parameters {
                Value::Null => json!({"type": "object"}),
                p => p.clone(),
            };
            let mut properties = serde_json::Map::new();
            properties.insert("name".into(), json!({"const": t.name}));
            properties.insert(syntax.arguments_key().into(), parameters);
            json!({
                "type": "object",
                "properties": properties,
                "required": ["name", syntax.arguments_key()],
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

/// The Lark rules of calls: `calls` is one call, or for Hermes with `parallel` up to one per
/// offered tool (a small model asked for "one or more" calls tends to repeat its call until
/// the token limit; the bound ends the output once every tool could have been called).
fn call_rules(
    compiler: &ConstraintCompiler,
    syntax: CallSyntax,
    tools: &[&ToolSpec],
    parallel: bool,
) -> String {
    let schema = call_schema(syntax, tools);
    match syntax {
        CallSyntax::Hermes => {
            let max_calls = if parallel { tools.len().max(1) } else { 1 };
            let mut calls = String::from("call_block");
            for _ in 1..max_calls {
                calls = format!("call_block (\"\\n\"? {calls})?");
            }
            format!(
                "calls: {calls}\ncall_block: {open} \"\\n\"? call \"\\n\"? {close}\ncall: %json {schema}\n",
                open = literal(compiler, CALL_OPEN),
                close = literal(compiler, CALL_CLOSE),
            )
        }
        CallSyntax::Llama3Json => {
            // The tag only where the vocabulary has it as a control token.
            let tag = if compiler.is_special_token(PYTHON_TAG) {
                format!("{PYTHON_TAG}? ")
            } else {
                String::new()
            };
            format!("calls: {tag}call\ncall: %json {schema}\n")
        }
    }
}

fn offered<'a>(tools: &'a [ToolSpec], mode: Option<&CallMode>) -> Vec<&'a ToolSpec> {
    match mode {
        Some(CallMode::Named(name)) => tools.iter().filter(|t| &t.name == name).collect(),
        _ => tools.iter().collect(),
    }
}

/// The grammar of a forced call: the output is one call (several when `parallel`, the mode is
/// `Required` and the syntax allows it) and nothing else.
pub fn forced_grammar(
    compiler: &ConstraintCompiler,
    syntax: CallSyntax,
    tools: &[ToolSpec],
    mode: &CallMode,
    parallel: bool,
) -> String {
    let tools = offered(tools, Some(mode));
    let parallel = parallel && matches!(mode, CallMode::Required);
    format!(
        "start: calls\n{}",
        call_rules(compiler, syntax, &tools, parallel)
    )
}

/// The grammar that takes over when a model that may choose (`auto`) starts a call: the text it
/// wrote from the start of the token where the trigger begins (`before`), then calls.
pub fn late_grammar(
    compiler: &ConstraintCompiler,
    syntax: CallSyntax,
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
        call_rules(compiler, syntax, &tools, parallel)
    )
}

#[cfg(test)]
mod tests;
