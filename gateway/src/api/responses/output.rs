//! The response object and its stream of typed events, built by one fold over the backend's
//! events: the non-streamed response is the fold's final state, the streamed one is every
//! event the fold emits on the way (`response.created` … `response.completed`), each with its
//! `sequence_number`.

use serde_json::{json, Value};

use crate::backend::Usage;

/// What the response echoes of its request.
#[derive(Debug, Clone)]
pub struct Echo {
    pub id: String,
    pub created_at: u64,
    pub model: String,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub tools: Value,
    pub tool_choice: Value,
    pub parallel_tool_calls: bool,
    pub text_format: Value,
    pub previous_response_id: Option<String>,
    pub store: bool,
    pub metadata: Value,
    pub user: Option<String>,
}

/// How the response ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    InProgress,
    Completed,
    /// `max_output_tokens` (or the context) ran out.
    Incomplete,
    Failed(String),
}

impl Status {
    fn as_str(&self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Incomplete => "incomplete",
            Self::Failed(_) => "failed",
        }
    }
}

#[derive(Debug, Clone)]
enum Output {
    Message {
        id: String,
        text: String,
        done: bool,
    },
    Call {
        id: String,
        index: u32,
        call_id: String,
        name: String,
        arguments: String,
        done: bool,
    },
}

impl Output {
    fn json(&self, item_status: &str) -> Value {
        match self {
            Self::Message { id, text, done } => {
                let status = if *done { item_status } else { "in_progress" };
                let content = if *done {
                    json!([{"type": "output_text", "text": text, "annotations": [], "logprobs": []}])
                } else {
                    json!([])
                };
                json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
            }
            Self::Call {
                id,
                call_id,
                name,
                arguments,
                done,
                ..
            } => {
                let status = if *done { item_status } else { "in_progress" };
                let arguments = if *done { arguments.as_str() } else { "" };
                json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
                       "arguments": arguments, "status": status})
            }
        }
    }
}

/// The fold.
#[derive(Debug)]
pub struct Builder {
    echo: Echo,
    outputs: Vec<Output>,
    sequence: u64,
    status: Status,
    usage: Option<Usage>,
}

impl Builder {
    pub fn new(echo: Echo) -> Self {
        Self {
            echo,
            outputs: Vec::new(),
            sequence: 0,
            status: Status::InProgress,
            usage: None,
        }
    }

    fn event(&mut self, kind: &str, mut body: Value) -> (String, Value) {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        (kind.to_string(), body)
    }

    fn item_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}_{}{:03}",
            self.echo.id.trim_start_matches("resp_"),
            self.outputs.len()
        )
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<(String, Value)> {
        let r = self.response();
        vec![
            self.event("response.created", json!({"response": r})),
            self.event("response.in_progress", json!({"response": r})),
        ]
    }

    /// Closes the open item, if any.
    fn close(&mut self) -> Vec<(String, Value)> {
        let index = self.outputs.len().saturating_sub(1);
        let status = match self.status {
            Status::Incomplete => "incomplete",
            _ => "completed",
        };
        let Some(last) = self.outputs.last_mut() else {
            return Vec::new();
        };
        let mut events = Vec::new();
        match last {
            Output::Message { done: true, .. } | Output::Call { done: true, .. } => {}
            Output::Message { id, text, done } => {
                *done = true;
                let (id, text) = (id.clone(), text.clone());
                let part =
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                events.push(self.event(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                ));
                events.push(self.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                ));
            }
            Output::Call {
                id,
                name,
                arguments,
                done,
                ..
            } => {
                *done = true;
                let (id, name, arguments) = (id.clone(), name.clone(), arguments.clone());
                events.push(self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "name": name, "arguments": arguments}),
                ));
            }
        }
        if let Some(item) = self.outputs.last().map(|o| o.json(status)) {
            events.push(self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            ));
        }
        events
    }

    /// Generated text.
    pub fn on_text(&mut self, delta: &str) -> Vec<(String, Value)> {
        if delta.is_empty() {
            return Vec::new();
        }
        let mut events = Vec::new();
        if !matches!(
            self.outputs.last(),
            Some(Output::Message { done: false, .. })
        ) {
            events.extend(self.close());
            let id = self.item_id("msg");
            self.outputs.push(Output::Message {
                id: id.clone(),
                text: String::new(),
                done: false,
            });
            let index = self.outputs.len() - 1;
            let item = self.outputs[index].json("in_progress");
            events.push(self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            ));
            events.push(self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
            ));
        }
        let index = self.outputs.len() - 1;
        let mut item_id = String::new();
        if let Some(Output::Message { id, text, .. }) = self.outputs.last_mut() {
            text.push_str(delta);
            item_id = id.clone();
        }
        events.push(self.event(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []}),
        ));
        events
    }

    /// A part of function call `index`: its first part carries the call id and name.
    pub fn on_call(
        &mut self,
        index: u32,
        call_id: Option<String>,
        name: Option<String>,
        arguments: &str,
    ) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        let open_same = matches!(self.outputs.last(), Some(Output::Call { index: i, done: false, .. }) if *i == index);
        if !open_same {
            events.extend(self.close());
            let id = self.item_id("fc");
            self.outputs.push(Output::Call {
                id,
                index,
                call_id: call_id.clone().unwrap_or_default(),
                name: name.clone().unwrap_or_default(),
                arguments: String::new(),
                done: false,
            });
            let output_index = self.outputs.len() - 1;
            let item = self.outputs[output_index].json("in_progress");
            events.push(self.event(
                "response.output_item.added",
                json!({"output_index": output_index, "item": item}),
            ));
        }
        let output_index = self.outputs.len() - 1;
        let mut item_id = String::new();
        if let Some(Output::Call {
            id,
            call_id: c,
            name: n,
            arguments: a,
            ..
        }) = self.outputs.last_mut()
        {
            if let Some(call_id) = call_id {
                *c = call_id;
            }
            if let Some(name) = name {
                *n = name;
            }
            a.push_str(arguments);
            item_id = id.clone();
        }
        if !arguments.is_empty() {
            events.push(self.event(
                "response.function_call_arguments.delta",
                json!({"item_id": item_id, "output_index": output_index, "delta": arguments}),
            ));
        }
        events
    }

    /// The end: closes the open item and emits `response.completed`, `.incomplete` or
    /// `.failed` with the whole response.
    pub fn finish(&mut self, status: Status, usage: Option<Usage>) -> Vec<(String, Value)> {
        self.status = status;
        self.usage = usage;
        let mut events = self.close();
        let kind = match self.status {
            Status::Completed | Status::InProgress => "response.completed",
            Status::Incomplete => "response.incomplete",
            Status::Failed(_) => "response.failed",
        };
        let r = self.response();
        events.push(self.event(kind, json!({"response": r})));
        events
    }

    /// The response object in its current state.
    pub fn response(&self) -> Value {
        let e = &self.echo;
        let item_status = match self.status {
            Status::Incomplete => "incomplete",
            _ => "completed",
        };
        let output: Vec<Value> = self.outputs.iter().map(|o| o.json(item_status)).collect();
        let usage = self.usage.map(|u| {
            json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            })
        });
        let (error, incomplete) = match &self.status {
            Status::Failed(message) => (
                json!({"code": "server_error", "message": message}),
                Value::Null,
            ),
            Status::Incomplete => (Value::Null, json!({"reason": "max_output_tokens"})),
            _ => (Value::Null, Value::Null),
        };
        json!({
            "id": e.id,
            "object": "response",
            "created_at": e.created_at,
            "status": self.status.as_str(),
            "background": false,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": e.instructions,
            "max_output_tokens": e.max_output_tokens,
            "model": e.model,
            "output": output,
            "parallel_tool_calls": e.parallel_tool_calls,
            "previous_response_id": e.previous_response_id,
            "reasoning": {"effort": null, "summary": null},
            "store": e.store,
            "temperature": e.temperature,
            "text": {"format": e.text_format},
            "tool_choice": e.tool_choice,
            "tools": e.tools,
            "top_p": e.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": e.user,
            "metadata": e.metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo() -> Echo {
        Echo {
            id: "resp_abc".into(),
            created_at: 1,
            model: "m".into(),
            instructions: None,
            max_output_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            tools: json!([]),
            tool_choice: json!("auto"),
            parallel_tool_calls: true,
            text_format: json!({"type": "text"}),
            previous_response_id: None,
            store: true,
            metadata: json!({}),
            user: None,
        }
    }

    #[test]
    fn events_come_in_openai_order_with_sequence_numbers() {
        let mut b = Builder::new(echo());
        let mut events = b.start();
        events.extend(b.on_text("Let me "));
        events.extend(b.on_text("check."));
        events.extend(b.on_call(0, Some("call_1".into()), Some("w".into()), ""));
        events.extend(b.on_call(0, None, None, "{\"a\":1}"));
        events.extend(b.finish(
            Status::Completed,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7,
                ..Usage::default()
            }),
        ));
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (_, e)) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], json!(i));
        }
        let r = b.response();
        assert_eq!(r["output"][0]["content"][0]["text"], "Let me check.");
        assert_eq!(r["output"][1]["arguments"], "{\"a\":1}");
        assert_eq!(r["output"][1]["call_id"], "call_1");
        assert_eq!(r["usage"]["total_tokens"], 12);
    }
}
