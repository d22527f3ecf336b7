//! Validation of a chat or completions body into a [`Plan`]: one backend request per choice,
//! sampling parameters range-checked, messages and tool calls, `response_format`, `tools` and
//! `tool_choice`. Every refusal is a 400 that names the field.

use super::{
    ChatRequest, CommonParams, CompletionRequest, MessageContent, MessageIn, OneOrMany,
    PredictionIn, PromptIn, ResponseFormatIn, ToolChoiceIn, ToolIn,
};
use crate::backend::{
    ChatMessage, GenerateRequest, Prompt, ResponseFormat, SamplingParams, ToolCall, ToolChoice,
    ToolDef, ToolsRequest,
};
use crate::error::ApiError;
use std::collections::BTreeMap;

mod tools;
use tools::tools_request;

/// What a validated request asks for.
#[derive(Debug, Clone)]
pub struct Plan {
    pub model: String,
    /// One request per choice, in choice order (`prompt index * n + i`).
    pub choices: Vec<GenerateRequest>,
    /// Choices per prompt.
    pub n: u32,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: Option<u32>,
    /// The `service_tier` asked for (`None`: as `auto`).
    pub service_tier: Option<super::RequestedTier>,
}

pub const MAX_STOP: usize = 4;

fn range(
    param: &'static str,
    v: Option<f32>,
    lo: f32,
    hi: f32,
    default: f32,
) -> Result<f32, ApiError> {
    let Some(v) = v else { return Ok(default) };
    if !v.is_finite() || v < lo {
        return Err(ApiError::invalid(
            format!("{v} is less than the minimum of {lo} - '{param}'"),
            param,
        ));
    }
    if v > hi {
        return Err(ApiError::invalid(
            format!("{v} is greater than the maximum of {hi} - '{param}'"),
            param,
        ));
    }
    Ok(v)
}

fn sampling(
    common: &CommonParams,
    max_tokens: Option<u32>,
    logprobs: Option<u32>,
) -> Result<SamplingParams, ApiError> {
    let temperature = range("temperature", common.temperature, 0.0, 2.0, 1.0)?;
    let top_p = range("top_p", common.top_p, 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::invalid(
            "top_p must be greater than 0 - 'top_p'",
            "top_p",
        ));
    }
    let frequency_penalty = range(
        "frequency_penalty",
        common.frequency_penalty,
        -2.0,
        2.0,
        0.0,
    )?;
    let presence_penalty = range("presence_penalty", common.presence_penalty, -2.0, 2.0, 0.0)?;
    let repetition_penalty = range(
        "repetition_penalty",
        common.repetition_penalty,
        0.01,
        10.0,
        1.0,
    )?;
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens must be at least 1 - 'max_tokens'",
            "max_tokens",
        ));
    }
    let stop: Vec<String> = common
        .stop
        .clone()
        .map(OneOrMany::into_vec)
        .unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            format!(
                "{} stop sequences were given; at most {MAX_STOP} are allowed - 'stop'",
                stop.len()
            ),
            "stop",
        ));
    }
    let logit_bias = logit_bias(common.logit_bias.as_ref())?;
    Ok(SamplingParams {
        max_tokens,
        temperature,
        top_p,
        top_k: common.top_k.unwrap_or(0),
        // A negative seed keeps its bits: a seed of its own, reproducible like any other.
        seed: common.seed.map(i64::cast_unsigned),
        frequency_penalty,
        presence_penalty,
        repetition_penalty,
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        logprobs,
        logit_bias,
    })
}

/// Most tokens one `logit_bias` may name (OpenAI's limit).
const MAX_LOGIT_BIAS_TOKENS: usize = 300;

/// `logit_bias` as `(token id, bias)`: keys must be token ids, biases within [-100, 100].
fn logit_bias(bias: Option<&BTreeMap<String, f32>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(bias) = bias else {
        return Ok(Vec::new());
    };
    if bias.len() > MAX_LOGIT_BIAS_TOKENS {
        return Err(ApiError::invalid(
            format!(
                "'logit_bias' names {} tokens; at most {MAX_LOGIT_BIAS_TOKENS} are allowed - 'logit_bias'",
                bias.len()
            ),
            "logit_bias",
        ));
    }
    bias.iter()
        .map(|(k, &b)| {
            let token: u32 = k.parse().map_err(|_| {
                let shown: String = k.chars().take(40).collect();
                ApiError::invalid(
                    format!(
                        "Invalid key in 'logit_bias': {shown:?} is not a token id - 'logit_bias'"
                    ),
                    "logit_bias",
                )
            })?;
            if !(-100.0..=100.0).contains(&b) {
                return Err(ApiError::invalid(
                    format!(
                        "the bias {b} of token {token} is not between -100 and 100 - 'logit_bias'"
                    ),
                    "logit_bias",
                ));
            }
            Ok((token, b))
        })
        .collect()
}

fn choices_n(common: &CommonParams, max_n: u32) -> Result<u32, ApiError> {
    let n = common.n.unwrap_or(1);
    if n < 1 {
        return Err(ApiError::invalid(
            format!("{n} is less than the minimum of 1 - 'n'"),
            "n",
        ));
    }
    if n > max_n {
        return Err(ApiError::invalid(
            format!("{n} is greater than the maximum of {max_n} - 'n'"),
            "n",
        ));
    }
    Ok(n)
}

/// What a request asks of the output besides sampling.
#[derive(Debug, Clone, Default)]
struct OutputSpec {
    response_format: ResponseFormat,
    tools: Option<ToolsRequest>,
    prediction: Option<String>,
}

fn fan_out(
    model: &str,
    request_id: &str,
    prompts: Vec<Prompt>,
    n: u32,
    params: SamplingParams,
    output: OutputSpec,
) -> Vec<GenerateRequest> {
    let mut out = Vec::with_capacity(prompts.len() * usize::try_from(n).unwrap_or(1));
    for prompt in prompts {
        for i in 0..n {
            let mut params = params.clone();
            // Each choice samples on its own; seeded choices stay reproducible.
            params.seed = params.seed.map(|s| s.wrapping_add(u64::from(i)));
            out.push(GenerateRequest {
                request_id: request_id.to_string(),
                model: model.to_string(),
                prompt: prompt.clone(),
                params,
                response_format: output.response_format.clone(),
                tools: output.tools.clone(),
                customer: None,
                scheduling_weight: None,
                service_tier: Default::default(),
                max_queue_wait: None,
                prediction: output.prediction.clone(),
                adapter: None,
            });
        }
    }
    out
}

/// Message content as text (only `text` parts are supported; `param` names the content in
/// a refusal).
fn content_text(content: Option<MessageContent>, param: &str) -> Result<String, ApiError> {
    Ok(match content {
        None => String::new(),
        Some(MessageContent::Text(t)) => t,
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                if part.kind != "text" {
                    return Err(ApiError::InvalidRequest {
                        message: format!(
                            "content parts of type `{}` are not supported by this model; only `text`",
                            part.kind
                        ),
                        param: Some(param.to_string()),
                    });
                }
                text.push_str(part.text.as_deref().unwrap_or(""));
            }
            text
        }
    })
}

fn invalid_at(param: String, message: String) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("{message} - '{param}'"),
        param: Some(param),
    }
}

/// Validates the conversation: roles, tool calls of assistant messages, and that every tool
/// message answers a call made earlier.
fn chat_messages(input: Vec<MessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid(
            "[] is too short - 'messages'",
            "messages",
        ));
    }
    let mut messages = Vec::with_capacity(input.len());
    let mut call_ids: Vec<String> = Vec::new();
    for (i, m) in input.into_iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "developer" | "user" | "assistant" | "tool"
        ) {
            return Err(invalid_at(
                format!("messages.[{i}].role"),
                format!(
                    "role `{}` is not supported (use system, developer, user, assistant or tool)",
                    m.role
                ),
            ));
        }
        let content = content_text(m.content, &format!("messages.[{i}].content"))?;
        let mut tool_calls = Vec::new();
        if let Some(calls) = m.tool_calls {
            if m.role != "assistant" {
                return Err(invalid_at(
                    format!("messages.[{i}].tool_calls"),
                    "only assistant messages carry tool_calls".into(),
                ));
            }
            for (k, c) in calls.into_iter().enumerate() {
                if c.kind != "function" {
                    return Err(invalid_at(
                        format!("messages.[{i}].tool_calls.[{k}].type"),
                        format!(
                            "tool call type `{}` is not supported; only `function`",
                            c.kind
                        ),
                    ));
                }
                call_ids.push(c.id.clone());
                tool_calls.push(ToolCall {
                    id: c.id,
                    name: c.function.name,
                    arguments: c.function.arguments,
                });
            }
        }
        let tool_call_id = match (m.role.as_str(), m.tool_call_id) {
            ("tool", None) => {
                return Err(invalid_at(
                    format!("messages.[{i}].tool_call_id"),
                    "a tool message needs the tool_call_id of the call it answers".into(),
                ))
            }
            ("tool", Some(id)) if !call_ids.contains(&id) => {
                return Err(invalid_at(
                    format!("messages.[{i}].tool_call_id"),
                    format!("no earlier assistant message made a tool call with id `{id}`"),
                ))
            }
            (_, id) => id,
        };
        messages.push(ChatMessage {
            role: m.role,
            content,
            tool_calls,
            tool_call_id,
        });
    }
    Ok(messages)
}

/// A function name OpenAI accepts: `^[a-zA-Z0-9_-]{1,64}$`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn response_format(input: Option<ResponseFormatIn>) -> Result<ResponseFormat, ApiError> {
    let Some(f) = input else {
        return Ok(ResponseFormat::Text);
    };
    match f.kind.as_str() {
        "text" => Ok(ResponseFormat::Text),
        "json_object" => Ok(ResponseFormat::JsonObject),
        "json_schema" => {
            let Some(js) = f.json_schema else {
                return Err(ApiError::invalid(
                    "`json_schema` is required when the type is json_schema - 'response_format.json_schema'",
                    "response_format.json_schema",
                ));
            };
            if !valid_name(&js.name) {
                return Err(ApiError::invalid(
                    format!("`{}` is not a valid schema name (1-64 of a-z, A-Z, 0-9, _ and -) - 'response_format.json_schema.name'", js.name),
                    "response_format.json_schema.name",
                ));
            }
            let schema = js.schema.unwrap_or_else(|| serde_json::json!({}));
            if !schema.is_object() {
                return Err(ApiError::invalid(
                    "the schema must be a JSON object - 'response_format.json_schema.schema'",
                    "response_format.json_schema.schema",
                ));
            }
            Ok(ResponseFormat::JsonSchema {
                name: js.name,
                schema,
                strict: js.strict.unwrap_or(false),
            })
        }
        other => Err(ApiError::invalid(
            format!("`{other}` is not a valid response format (text, json_object, json_schema) - 'response_format.type'"),
            "response_format.type",
        )),
    }
}

/// `prediction` as the text the answer is expected to be: `{"type": "content", "content"}`
/// with a text or text parts. It is honoured with every other argument (`n`, `logprobs`,
/// penalties, `tools`, `response_format`, `max_completion_tokens`), where OpenAI refuses
/// them: the engine verifies a draft position by sampling it as without the draft, so the
/// answer cannot depend on it. An empty prediction is none.
fn prediction(input: Option<PredictionIn>) -> Result<Option<String>, ApiError> {
    let Some(p) = input else { return Ok(None) };
    if p.kind != "content" {
        return Err(ApiError::invalid(
            format!(
                "`{}` is not a valid prediction type (only `content`) - 'prediction.type'",
                p.kind
            ),
            "prediction.type",
        ));
    }
    let text = content_text(Some(p.content), "prediction.content")?;
    Ok((!text.is_empty()).then_some(text))
}

impl ChatRequest {
    pub fn plan(self, request_id: &str, max_n: u32) -> Result<Plan, ApiError> {
        if self.functions.is_some() || self.function_call.is_some() {
            let param = if self.functions.is_some() {
                "functions"
            } else {
                "function_call"
            };
            return Err(ApiError::invalid(
                format!("`{param}` is deprecated and not supported; use `tools` and `tool_choice` - '{param}'"),
                param,
            ));
        }
        let messages = chat_messages(self.messages)?;
        let response_format = response_format(self.response_format)?;
        let tools = tools_request(self.tools, self.tool_choice, self.parallel_tool_calls)?;
        if tools.as_ref().is_some_and(|t| t.choice != ToolChoice::None)
            && response_format != ResponseFormat::Text
        {
            return Err(ApiError::invalid(
                "`response_format` cannot be combined with `tools` unless `tool_choice` is \"none\" - 'response_format'",
                "response_format",
            ));
        }
        // With `none` the model is not shown the tools at all.
        let tools = tools.filter(|t| t.choice != ToolChoice::None);
        let output = OutputSpec {
            response_format,
            tools,
            prediction: prediction(self.prediction)?,
        };
        let max_tokens = self.max_completion_tokens.or(self.common.max_tokens);
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs requires logprobs to be true - 'top_logprobs'",
                    "top_logprobs",
                ))
            }
            (true, Some(k)) if k > 20 => {
                return Err(ApiError::invalid(
                    format!("{k} is greater than the maximum of 20 - 'top_logprobs'"),
                    "top_logprobs",
                ))
            }
            (true, k) => Some(k.unwrap_or(0)),
            (false, None) => None,
        };
        let params = sampling(&self.common, max_tokens, logprobs)?;
        let n = choices_n(&self.common, max_n)?;
        let stream = self.common.stream.unwrap_or(false);
        Ok(Plan {
            choices: fan_out(
                &self.model,
                request_id,
                vec![Prompt::Chat(messages)],
                n,
                params,
                output,
            ),
            model: self.model,
            n,
            stream,
            include_usage: stream && self.common.stream_options.is_some_and(|o| o.include_usage),
            logprobs,
            service_tier: self.common.service_tier,
        })
    }
}

impl CompletionRequest {
    pub fn plan(self, request_id: &str, max_n: u32) -> Result<Plan, ApiError> {
        let prompts = match self.prompt {
            PromptIn::Text(t) => vec![t],
            PromptIn::Texts(v) if !v.is_empty() => v,
            PromptIn::Texts(_) => {
                return Err(ApiError::invalid("[] is too short - 'prompt'", "prompt"))
            }
            PromptIn::Tokens(_) | PromptIn::TokenLists(_) => {
                return Err(ApiError::invalid(
                    "prompts of token ids are not supported; send text",
                    "prompt",
                ))
            }
        };
        if prompts.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "the prompt is empty - 'prompt'",
                "prompt",
            ));
        }
        if self.echo == Some(true) {
            return Err(ApiError::invalid("echo is not supported", "echo"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix is not supported", "suffix"));
        }
        if self.best_of.is_some_and(|b| b > 1) {
            return Err(ApiError::invalid("best_of is not supported", "best_of"));
        }
        if let Some(k) = self.logprobs {
            if k > 5 {
                return Err(ApiError::invalid(
                    format!("{k} is greater than the maximum of 5 - 'logprobs'"),
                    "logprobs",
                ));
            }
        }
        let params = sampling(
            &self.common,
            Some(self.common.max_tokens.unwrap_or(16)),
            self.logprobs,
        )?;
        let n = choices_n(&self.common, max_n)?;
        let stream = self.common.stream.unwrap_or(false);
        let prompts = prompts.into_iter().map(Prompt::Text).collect();
        let output = OutputSpec {
            response_format: response_format(self.response_format)?,
            tools: None,
            prediction: None,
        };
        Ok(Plan {
            choices: fan_out(&self.model, request_id, prompts, n, params, output),
            model: self.model,
            n,
            stream,
            include_usage: stream && self.common.stream_options.is_some_and(|o| o.include_usage),
            logprobs: self.logprobs,
            service_tier: self.common.service_tier,
        })
    }
}

#[cfg(test)]
mod tests;
