//! `POST /v1/responses` bodies: the input items, validated with their paths (`input.[3].call_id`),
//! and their translation into the chat request the backends already serve, so structured
//! outputs, tools, limits and billing are the same code as chat completions.
//!
//! It owns the Responses API's request shapes and the conversation items; the response objects
//! and events are in `output`, storage in `store`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::api::openai::{ChatRequest, Plan};
use crate::error::ApiError;

/// The request body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct CreateResponse {
    pub model: String,
    /// A string, or a list of input items (messages, function calls and their outputs).
    pub input: Option<Value>,
    pub instructions: Option<String>,
    #[schema(minimum = 1)]
    pub max_output_tokens: Option<u32>,
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub text: Option<TextConfig>,
    pub stream: Option<bool>,
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    pub metadata: Option<Map<String, Value>>,
    pub user: Option<String>,
    pub store: Option<bool>,
    pub previous_response_id: Option<String>,
    /// Known fields the server cannot honour: refused when they ask for something.
    pub background: Option<bool>,
    pub reasoning: Option<Value>,
    pub truncation: Option<String>,
    pub include: Option<Vec<String>>,
    pub top_logprobs: Option<u32>,
    /// The class of service to run at; the response says the one that served it.
    pub service_tier: Option<crate::api::openai::RequestedTier>,
}

impl crate::error::RequestBody for CreateResponse {
    const FIELDS: &'static [&'static str] = &[
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "stream",
        "metadata",
        "user",
        "store",
        "previous_response_id",
        "background",
        "reasoning",
        "truncation",
        "include",
        "top_logprobs",
        "service_tier",
    ];
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct TextConfig {
    pub format: Option<Value>,
}

/// One conversation item, in a canonical form (stored, and listed by `input_items`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Item {
    Message {
        role: String,
        text: String,
    },
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
    },
    FunctionCallOutput {
        call_id: String,
        output: String,
    },
}

fn invalid(param: String, message: impl std::fmt::Display) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("{message} - '{param}'"),
        param: Some(param),
    }
}

/// The text of message content: a string, or `input_text` / `output_text` parts.
fn content_text(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (k, part) in parts.iter().enumerate() {
                match part["type"].as_str() {
                    Some("input_text" | "output_text" | "text") => {
                        text.push_str(part["text"].as_str().unwrap_or_default())
                    }
                    Some(other) => {
                        return Err(invalid(
                            format!("{at}.content.[{k}].type"),
                            format!(
                            "content of type `{other}` is not supported by this model; only text"
                        ),
                        ))
                    }
                    None => {
                        return Err(invalid(
                            format!("{at}.content.[{k}].type"),
                            "a content part needs a type",
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(invalid(
            format!("{at}.content"),
            "content must be a string or a list of parts",
        )),
    }
}

fn string_field(item: &Value, key: &str, at: &str) -> Result<String, ApiError> {
    item[key]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| invalid(format!("{at}.{key}"), format!("`{key}` is required")))
}

/// The request's `input` as items.
pub fn input_items(input: Option<&Value>) -> Result<Vec<Item>, ApiError> {
    let items = match input {
        None => return Err(invalid("input".into(), "`input` is required")),
        Some(Value::String(text)) => {
            return Ok(vec![Item::Message {
                role: "user".into(),
                text: text.clone(),
            }])
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(invalid(
                "input".into(),
                "input must be a string or a list of items",
            ))
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("input.[{i}]");
        let kind = item["type"]
            .as_str()
            .unwrap_or(if item.get("role").is_some() {
                "message"
            } else {
                ""
            });
        out.push(match kind {
            "message" => {
                let role = string_field(item, "role", &at)?;
                if !matches!(role.as_str(), "user" | "system" | "developer" | "assistant") {
                    return Err(invalid(
                        format!("{at}.role"),
                        format!("role `{role}` is not supported (use user, system, developer or assistant)"),
                    ));
                }
                Item::Message {
                    role,
                    text: content_text(&item["content"], &at)?,
                }
            }
            "function_call" => Item::FunctionCall {
                call_id: string_field(item, "call_id", &at)?,
                name: string_field(item, "name", &at)?,
                arguments: string_field(item, "arguments", &at)?,
            },
            "function_call_output" => Item::FunctionCallOutput {
                call_id: string_field(item, "call_id", &at)?,
                output: match &item["output"] {
                    Value::String(s) => s.clone(),
                    Value::Null => {
                        return Err(invalid(format!("{at}.output"), "`output` is required"))
                    }
                    other => content_text(other, &at)?,
                },
            },
            "" => return Err(invalid(format!("{at}.type"), "an input item needs a type")),
            other => {
                return Err(invalid(
                    format!("{at}.type"),
                    format!("input items of type `{other}` are not supported (message, function_call, function_call_output)"),
                ))
            }
        });
    }
    Ok(out)
}

/// The items as chat messages (calls joined to the assistant turn they follow), after
/// `instructions` as a system message. Every function output must answer an earlier call.
fn chat_messages(instructions: Option<&str>, items: &[Item]) -> Result<Vec<Value>, ApiError> {
    let mut messages: Vec<Value> = Vec::with_capacity(items.len() + 1);
    if let Some(i) = instructions.filter(|i| !i.is_empty()) {
        messages.push(json!({"role": "system", "content": i}));
    }
    let mut calls: Vec<&str> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item {
            Item::Message { role, text } => messages.push(json!({"role": role, "content": text})),
            Item::FunctionCall {
                call_id,
                name,
                arguments,
            } => {
                calls.push(call_id);
                let call = json!({"id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": arguments}});
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" => {
                        if !last["tool_calls"].is_array() {
                            last["tool_calls"] = json!([]);
                        }
                        if let Some(list) = last["tool_calls"].as_array_mut() {
                            list.push(call);
                        }
                    }
                    _ => messages
                        .push(json!({"role": "assistant", "content": "", "tool_calls": [call]})),
                }
            }
            Item::FunctionCallOutput { call_id, output } => {
                if !calls.contains(&call_id.as_str()) {
                    return Err(invalid(
                        format!("input.[{i}].call_id"),
                        format!(
                            "no function_call with call_id `{call_id}` comes before this output"
                        ),
                    ));
                }
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
        }
    }
    Ok(messages)
}

/// Maps a chat request's `param` to the Responses field it came from.
pub fn response_param(param: &str) -> String {
    const MAP: [(&str, &str); 7] = [
        ("response_format.json_schema.schema", "text.format.schema"),
        ("response_format.json_schema", "text.format"),
        ("response_format", "text.format"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("max_completion_tokens", "max_output_tokens"),
        ("max_tokens", "max_output_tokens"),
        ("messages", "input"),
    ];
    if let Some(rest) = param.strip_prefix("tools.[") {
        if let Some((index, tail)) = rest.split_once("].function") {
            return format!("tools.[{index}]{tail}");
        }
    }
    for (from, to) in MAP {
        if let Some(tail) = param.strip_prefix(from) {
            return format!("{to}{tail}");
        }
    }
    param.to_string()
}

/// Rewrites an error's `param` (and its message's trailing `- 'param'`) to Responses terms.
pub fn in_response_terms(e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidRequest {
            message,
            param: Some(param),
        } => {
            let mapped = response_param(&param);
            ApiError::InvalidRequest {
                message: message.replace(&format!("'{param}'"), &format!("'{mapped}'")),
                param: Some(mapped),
            }
        }
        other => other,
    }
}

impl CreateResponse {
    /// Refuses what this server cannot do for a Responses request.
    fn check_supported(&self) -> Result<(), ApiError> {
        if self.background == Some(true) {
            return Err(invalid(
                "background".into(),
                "background responses are not supported",
            ));
        }
        if let Some(effort) = self
            .reasoning
            .as_ref()
            .and_then(|r| r.get("effort"))
            .filter(|e| !e.is_null())
        {
            return Err(invalid(
                "reasoning.effort".into(),
                format!("reasoning effort {effort} is not supported: this model does not reason"),
            ));
        }
        if let Some(t) = self.truncation.as_deref().filter(|t| *t != "disabled") {
            return Err(invalid(
                "truncation".into(),
                format!("truncation `{t}` is not supported; only `disabled` (a prompt too long for the context is refused)"),
            ));
        }
        if let Some(first) = self.include.iter().flatten().next() {
            return Err(invalid(
                "include".into(),
                format!("`{first}` cannot be included: this server produces no such output"),
            ));
        }
        if self.top_logprobs.is_some_and(|k| k > 0) {
            return Err(invalid(
                "top_logprobs".into(),
                "top_logprobs is not supported on /v1/responses; use /v1/chat/completions",
            ));
        }
        if let Some(m) = &self.metadata {
            if m.len() > 16 {
                return Err(invalid("metadata".into(), "at most 16 metadata pairs"));
            }
            for (k, v) in m {
                if k.chars().count() > 64
                    || !v.is_string()
                    || v.as_str().is_some_and(|v| v.chars().count() > 512)
                {
                    return Err(invalid(
                        format!("metadata.{k}"),
                        "metadata keys are strings of at most 64 characters, values strings of at most 512",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The chat request this response runs as, over `history` (the previous response's
    /// conversation) and this request's input. Returns the plan and this request's own input
    /// items.
    pub fn plan(
        &self,
        history: &[Item],
        request_id: &str,
        max_n: u32,
    ) -> Result<(Plan, Vec<Item>), ApiError> {
        self.check_supported()?;
        let input = input_items(self.input.as_ref())?;
        let mut conversation = history.to_vec();
        conversation.extend(input.iter().cloned());
        let messages = chat_messages(self.instructions.as_deref(), &conversation)?;
        let mut chat = json!({
            "model": self.model,
            "messages": messages,
            "stream": self.stream.unwrap_or(false),
            "service_tier": self.service_tier,
        });
        if self.stream.unwrap_or(false) {
            chat["stream_options"] = json!({"include_usage": true});
        }
        if let Some(m) = self.max_output_tokens {
            chat["max_completion_tokens"] = json!(m);
        }
        for (name, value) in [("temperature", self.temperature), ("top_p", self.top_p)] {
            if let Some(v) = value {
                // A number beyond f32's range arrives as an infinity, which JSON cannot carry
                // on to the chat validation (it would become `null`, i.e. the default).
                if !v.is_finite() {
                    return Err(invalid(name.to_string(), format!("{name} is out of range")));
                }
                chat[name] = json!(v);
            }
        }
        if let Some(tools) = &self.tools {
            chat["tools"] = json!(chat_tools(tools)?);
        }
        if let Some(choice) = &self.tool_choice {
            chat["tool_choice"] = chat_tool_choice(choice);
        }
        if let Some(p) = self.parallel_tool_calls {
            chat["parallel_tool_calls"] = json!(p);
        }
        if let Some(format) = self.text.as_ref().and_then(|t| t.format.as_ref()) {
            chat["response_format"] = chat_response_format(format);
        }
        if let Some(user) = &self.user {
            chat["user"] = json!(user);
        }
        let request: ChatRequest = serde_json::from_value(chat)
            .map_err(|e| invalid("input".into(), format!("invalid request: {e}")))?;
        let plan = request.plan(request_id, max_n).map_err(in_response_terms)?;
        Ok((plan, input))
    }
}

/// The Responses API's flat function tools (`{"type": "function", "name", "parameters", ...}`)
/// as chat tools (`{"type": "function", "function": {...}}`); other tool types are refused.
fn chat_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        match t["type"].as_str() {
            Some("function") => {}
            Some(other) => {
                return Err(invalid(
                    format!("tools.[{i}].type"),
                    format!("tools of type `{other}` are not supported; only `function`"),
                ))
            }
            None => return Err(invalid(format!("tools.[{i}].type"), "a tool needs a type")),
        }
        let mut f = json!({"name": t["name"], "parameters": t["parameters"]});
        if !t["description"].is_null() {
            f["description"] = t["description"].clone();
        }
        if !t["strict"].is_null() {
            f["strict"] = t["strict"].clone();
        }
        if t["parameters"].is_null() {
            f.as_object_mut().map(|o| o.remove("parameters"));
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(out)
}

/// A Responses `tool_choice` in chat terms: a named function (`{"type": "function", "name"}`)
/// becomes `{"type": "function", "function": {"name"}}`; the modes pass as they are.
fn chat_tool_choice(choice: &Value) -> Value {
    match choice {
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or(Value::Null)}})
        }
        other => other.clone(),
    }
}

/// `text.format` as a chat `response_format`: a flat `json_schema` format gains chat's
/// `json_schema` wrapper; the others pass as they are.
fn chat_response_format(format: &Value) -> Value {
    match format["type"].as_str() {
        Some("json_schema") => json!({
            "type": "json_schema",
            "json_schema": {"name": format["name"], "schema": format["schema"], "strict": format["strict"]},
        }),
        _ => format.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_map_to_response_fields() {
        assert_eq!(response_param("tools.[2].function.name"), "tools.[2].name");
        assert_eq!(
            response_param("response_format.json_schema.schema.properties.a.uniqueItems"),
            "text.format.schema.properties.a.uniqueItems"
        );
        assert_eq!(
            response_param("tool_choice.function.name"),
            "tool_choice.name"
        );
        assert_eq!(response_param("temperature"), "temperature");
    }

    /// Found by the Schemathesis run: `temperature: -6e307` overflowed f32 to -inf, went on as
    /// `null` and was served at the default temperature (and echoed as `null`).
    #[test]
    fn out_of_range_sampling_numbers_are_refused() {
        for (field, value) in [
            ("temperature", -5.979740653169396e307),
            ("temperature", 1e39),
            ("top_p", 1e300),
        ] {
            let body: CreateResponse =
                serde_json::from_value(json!({"model": "m", "input": "Hi", field: value})).unwrap();
            let e = body.plan(&[], "r", 1).unwrap_err();
            assert!(
                matches!(&e, ApiError::InvalidRequest { param: Some(p), .. } if p == field),
                "{field}={value}: {e:?}"
            );
        }
    }

    #[test]
    fn items_become_chat_turns() {
        let items = input_items(Some(&json!([
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and"}, {"type": "input_text", "text": " now?"}]},
        ])))
        .unwrap();
        let messages = chat_messages(Some("be brief"), &items).unwrap();
        assert_eq!(messages.len(), 5);
        assert_eq!(messages[0]["role"], "system");
        assert_eq!(messages[2]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(messages[3]["tool_call_id"], "c1");
        assert_eq!(messages[4]["content"], "and now?");

        let orphan = input_items(Some(
            &json!([{"type": "function_call_output", "call_id": "x", "output": "o"}]),
        ))
        .unwrap();
        let e = chat_messages(None, &orphan).unwrap_err();
        assert!(
            matches!(e, ApiError::InvalidRequest { param: Some(p), .. } if p == "input.[0].call_id")
        );
        let e = input_items(Some(&json!([{"type": "web_search_call"}]))).unwrap_err();
        assert!(
            matches!(e, ApiError::InvalidRequest { param: Some(p), .. } if p == "input.[0].type")
        );
    }
}
