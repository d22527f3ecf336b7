//! What the model reads for a request: the prompt rendered with its template (tools shown by
//! the template itself or by the fallback prompt) and tokenized, and the grammar its output
//! must follow.

use std::sync::Arc;

use serde_json::{json, Value};
use tollgate_gateway::backend::{
    ChatMessage, GenerateRequest, Prompt, ResponseFormat, ToolChoice, ToolsRequest,
};
use tollgate_runtime::chat_template::ChatTemplate;
use tollgate_runtime::constraint::{check_schema, ConstraintCompiler, Grammar};
use tollgate_runtime::engine::GenConstraint;
use tollgate_runtime::tokenizer::ModelTokenizer;
use tollgate_runtime::tools::{self, CallMode, ToolSpec};
use tollgate_runtime::Error as RuntimeError;

use super::LocalBackend;

impl LocalBackend {
    /// As [`Self::tokenize`], showing `tools` to the model: through its own template when it
    /// renders them, else with the fallback prompt in the system message.
    pub(super) fn tokenize_with_tools(
        tokenizer: &ModelTokenizer,
        template: &ChatTemplate,
        prompt: &Prompt,
        tools: Option<&ToolsRequest>,
    ) -> Result<Vec<u32>, RuntimeError> {
        match prompt {
            Prompt::Chat(messages) => {
                let native = template.renders_tools();
                let mut rendered: Vec<Value> = Vec::with_capacity(messages.len() + 1);
                for m in messages {
                    // Templates know `system`; OpenAI's `developer` role means the same.
                    let role = if m.role == "developer" {
                        "system"
                    } else {
                        &m.role
                    };
                    let message = if native {
                        native_message(role, m)
                    } else {
                        fallback_message(role, m, &mut rendered)
                    };
                    rendered.push(message);
                }
                rendered.retain(|m| !m.is_null());
                let tools_json = tools.map(|t| {
                    json!(t
                        .tools
                        .iter()
                        .map(|d| json!({"type": "function", "function": {
                            "name": d.name,
                            "description": d.description.clone().unwrap_or_default(),
                            "parameters": d.parameters,
                        }}))
                        .collect::<Vec<_>>())
                });
                if let (Some(t), false) = (tools, native) {
                    let prompt = tools::tools_prompt(&tool_specs(t));
                    match rendered.first_mut() {
                        Some(first) if first["role"] == "system" => {
                            let content = first["content"].as_str().unwrap_or_default();
                            first["content"] = json!(format!("{content}\n\n{prompt}"));
                        }
                        _ => rendered.insert(0, json!({"role": "system", "content": prompt})),
                    }
                }
                let tools_arg = if native { tools_json.as_ref() } else { None };
                let text = template.render_json(&rendered, tools_arg, true)?;
                tokenizer.encode(&text, false)
            }
            Prompt::Text(text) => tokenizer.encode(text, true),
        }
    }

    /// The grammar a request's output must follow, compiled for this model with `compiler`
    /// (`None` for a request with neither `response_format` nor `tools`); schema and grammar
    /// errors are 400s naming the field.
    pub(super) fn constraint(
        &self,
        compiler: Option<&Arc<ConstraintCompiler>>,
        request: &GenerateRequest,
    ) -> Result<Option<GenConstraint>, RuntimeError> {
        let Some(compiler) = compiler else {
            return Ok(None);
        };
        match (&request.response_format, &request.tools) {
            (ResponseFormat::JsonObject, _) => Ok(Some(GenConstraint::Now(Box::new(
                compiler.compile(&Grammar::JsonObject)?,
            )))),
            (ResponseFormat::JsonSchema { schema, .. }, _) => {
                let grammar = Grammar::JsonSchema {
                    schema: schema.clone(),
                    param: "response_format.json_schema.schema".into(),
                };
                Ok(Some(GenConstraint::Now(Box::new(
                    compiler.compile(&grammar)?,
                ))))
            }
            (ResponseFormat::Text, Some(t)) => {
                for (i, d) in t.tools.iter().enumerate() {
                    check_schema(&d.parameters, &format!("tools.[{i}].function.parameters"))?;
                }
                let specs = tool_specs(t);
                let syntax = self.template.call_syntax();
                let forced = |mode: &CallMode| {
                    compiler.compile(&Grammar::Lark(tools::forced_grammar(
                        compiler, syntax, &specs, mode, t.parallel,
                    )))
                };
                match &t.choice {
                    ToolChoice::None => Ok(None),
                    ToolChoice::Required => Ok(Some(GenConstraint::Now(Box::new(forced(
                        &CallMode::Required,
                    )?)))),
                    ToolChoice::Function(name) => Ok(Some(GenConstraint::Now(Box::new(forced(
                        &CallMode::Named(name.clone()),
                    )?)))),
                    ToolChoice::Auto => {
                        // Compiled once now so a bad schema is refused before any work.
                        forced(&CallMode::Required)?;
                        let compiler = compiler.clone();
                        let parallel = t.parallel;
                        Ok(Some(GenConstraint::AfterTrigger {
                            triggers: syntax.triggers(),
                            then: Arc::new(move |before: &str| {
                                compiler.compile(&Grammar::Lark(tools::late_grammar(
                                    &compiler, syntax, &specs, parallel, before,
                                )))
                            }),
                        }))
                    }
                }
            }
            (ResponseFormat::Text, None) => Ok(None),
        }
    }
}

fn tool_specs(t: &ToolsRequest) -> Vec<ToolSpec> {
    t.tools
        .iter()
        .map(|d| ToolSpec {
            name: d.name.clone(),
            description: d.description.clone(),
            parameters: d.parameters.clone(),
        })
        .collect()
}

/// A message for a template that renders tools itself (Hugging Face's shape: arguments as
/// objects).
fn native_message(role: &str, m: &ChatMessage) -> Value {
    let mut v = json!({"role": role, "content": m.content});
    if !m.tool_calls.is_empty() {
        v["tool_calls"] = json!(m
            .tool_calls
            .iter()
            .map(|c| {
                let arguments: Value = serde_json::from_str(&c.arguments)
                    .unwrap_or_else(|_| Value::String(c.arguments.clone()));
                json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments}})
            })
            .collect::<Vec<_>>());
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    v
}

/// A message for a template without tool support: calls written into the assistant's text as
/// the model writes them, results as `<tool_response>` in a user turn (consecutive results
/// share one turn, so templates that want alternating roles accept them). Returns `null` when
/// the message was merged into the previous one.
fn fallback_message(role: &str, m: &ChatMessage, so_far: &mut [Value]) -> Value {
    if role == "tool" {
        let response = tools::render_result(&m.content);
        if let Some(prev) = so_far.iter_mut().rev().find(|v| !v.is_null()) {
            let prev_text = prev["content"].as_str().unwrap_or_default().to_string();
            if prev["role"] == "user" && prev_text.ends_with("</tool_response>") {
                prev["content"] = json!(format!("{prev_text}\n{response}"));
                return Value::Null;
            }
        }
        return json!({"role": "user", "content": response});
    }
    let mut content = m.content.clone();
    for c in &m.tool_calls {
        if !content.is_empty() {
            content.push('\n');
        }
        content.push_str(&tools::render_call(&c.name, &c.arguments));
    }
    json!({"role": role, "content": content})
}
