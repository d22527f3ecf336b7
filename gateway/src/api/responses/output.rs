//! The response object and its stream of typed events, built by one fold over the backend's
//! events: the non-streamed response is the fold's final state, the streamed one is every
//! event the fold emits on the way (`response.created` … `response.completed`), each with its
//! `sequence_number`. The shapes are in `wire`.

use serde_json::{Map, Value};

use super::wire::{
    EventBody, IncompleteDetails, InputTokensDetails, ItemStatus, OutputItem, OutputText,
    OutputTokensDetails, Reasoning, Response, ResponseError, ResponseStatus, ResponseTextConfig,
    ResponseUsage, StreamEvent, ToolChoiceEcho,
};
use crate::backend::{ServiceTier, Usage};

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
    pub tools: Vec<Value>,
    pub tool_choice: ToolChoiceEcho,
    pub parallel_tool_calls: bool,
    pub text_format: Value,
    pub previous_response_id: Option<String>,
    pub store: bool,
    pub metadata: Map<String, Value>,
    pub user: Option<String>,
    /// The tier the request was admitted at.
    pub service_tier: ServiceTier,
    /// Whether it runs in the background (`background: true`).
    pub background: bool,
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
    fn wire(&self) -> ResponseStatus {
        match self {
            Self::InProgress => ResponseStatus::InProgress,
            Self::Completed => ResponseStatus::Completed,
            Self::Incomplete => ResponseStatus::Incomplete,
            Self::Failed(_) => ResponseStatus::Failed,
        }
    }

    /// The status of the items it closes.
    fn of_items(&self) -> ItemStatus {
        match self {
            Self::Incomplete => ItemStatus::Incomplete,
            _ => ItemStatus::Completed,
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
    /// The item as the API shows it: an open item is in progress and shows no content yet.
    fn item(&self, item_status: ItemStatus) -> OutputItem {
        match self {
            Self::Message { id, text, done } => OutputItem::Message {
                id: id.clone(),
                status: if *done {
                    item_status
                } else {
                    ItemStatus::InProgress
                },
                role: "assistant".into(),
                content: if *done {
                    vec![OutputText::new(text.clone())]
                } else {
                    Vec::new()
                },
            },
            Self::Call {
                id,
                call_id,
                name,
                arguments,
                done,
                ..
            } => OutputItem::FunctionCall {
                id: id.clone(),
                call_id: call_id.clone(),
                name: name.clone(),
                arguments: if *done {
                    arguments.clone()
                } else {
                    String::new()
                },
                status: if *done {
                    item_status
                } else {
                    ItemStatus::InProgress
                },
            },
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

    /// The response's id.
    pub fn id(&self) -> &str {
        &self.echo.id
    }

    fn event(&mut self, kind: &'static str, body: EventBody) -> StreamEvent {
        let event = StreamEvent {
            body,
            kind,
            sequence_number: self.sequence,
        };
        self.sequence += 1;
        event
    }

    /// An event carrying the whole response in its current state.
    fn response_event(&mut self, kind: &'static str) -> StreamEvent {
        let response = Box::new(self.response());
        self.event(kind, EventBody::Response { response })
    }

    /// An event carrying output item `output_index` in its current state.
    fn item_event(
        &mut self,
        kind: &'static str,
        output_index: usize,
        status: ItemStatus,
    ) -> Vec<StreamEvent> {
        let Some(item) = self.outputs.get(output_index).map(|o| o.item(status)) else {
            return Vec::new();
        };
        vec![self.event(kind, EventBody::Item { output_index, item })]
    }

    fn item_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}_{}{:03}",
            self.echo.id.trim_start_matches("resp_"),
            self.outputs.len()
        )
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<StreamEvent> {
        vec![
            self.response_event("response.created"),
            self.response_event("response.in_progress"),
        ]
    }

    /// Closes the open item, if any.
    fn close(&mut self) -> Vec<StreamEvent> {
        let output_index = self.outputs.len().saturating_sub(1);
        let Some(last) = self.outputs.last_mut() else {
            return Vec::new();
        };
        let mut events = Vec::new();
        match last {
            Output::Message { done: true, .. } | Output::Call { done: true, .. } => {}
            Output::Message { id, text, done } => {
                *done = true;
                let (item_id, text) = (id.clone(), text.clone());
                events.push(self.event(
                    "response.output_text.done",
                    EventBody::TextDone {
                        item_id: item_id.clone(),
                        output_index,
                        content_index: 0,
                        text: text.clone(),
                        logprobs: Vec::new(),
                    },
                ));
                events.push(self.event(
                    "response.content_part.done",
                    EventBody::Part {
                        item_id,
                        output_index,
                        content_index: 0,
                        part: OutputText::new(text),
                    },
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
                let body = EventBody::ArgumentsDone {
                    item_id: id.clone(),
                    output_index,
                    name: name.clone(),
                    arguments: arguments.clone(),
                };
                events.push(self.event("response.function_call_arguments.done", body));
            }
        }
        let status = self.status.of_items();
        events.extend(self.item_event("response.output_item.done", output_index, status));
        events
    }

    /// Closes the open item and opens `output` (`response.output_item.added`): its index and
    /// the events.
    fn open(&mut self, output: Output) -> (usize, Vec<StreamEvent>) {
        let mut events = self.close();
        self.outputs.push(output);
        let output_index = self.outputs.len() - 1;
        events.extend(self.item_event(
            "response.output_item.added",
            output_index,
            ItemStatus::InProgress,
        ));
        (output_index, events)
    }

    /// Generated text.
    pub fn on_text(&mut self, delta: &str) -> Vec<StreamEvent> {
        if delta.is_empty() {
            return Vec::new();
        }
        let mut events = Vec::new();
        if !matches!(
            self.outputs.last(),
            Some(Output::Message { done: false, .. })
        ) {
            let id = self.item_id("msg");
            let (output_index, added) = self.open(Output::Message {
                id: id.clone(),
                text: String::new(),
                done: false,
            });
            events.extend(added);
            events.push(self.event(
                "response.content_part.added",
                EventBody::Part {
                    item_id: id,
                    output_index,
                    content_index: 0,
                    part: OutputText::new(String::new()),
                },
            ));
        }
        let output_index = self.outputs.len() - 1;
        let mut item_id = String::new();
        if let Some(Output::Message { id, text, .. }) = self.outputs.last_mut() {
            text.push_str(delta);
            item_id = id.clone();
        }
        events.push(self.event(
            "response.output_text.delta",
            EventBody::TextDelta {
                item_id,
                output_index,
                content_index: 0,
                delta: delta.to_string(),
                logprobs: Vec::new(),
            },
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
    ) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        let open_same = matches!(self.outputs.last(), Some(Output::Call { index: i, done: false, .. }) if *i == index);
        if !open_same {
            let id = self.item_id("fc");
            let (_, added) = self.open(Output::Call {
                id,
                index,
                call_id: call_id.clone().unwrap_or_default(),
                name: name.clone().unwrap_or_default(),
                arguments: String::new(),
                done: false,
            });
            events.extend(added);
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
                EventBody::ArgumentsDelta {
                    item_id,
                    output_index,
                    delta: arguments.to_string(),
                },
            ));
        }
        events
    }

    /// The end: closes the open item and emits `response.completed`, `.incomplete` or
    /// `.failed` with the whole response.
    pub fn finish(&mut self, status: Status, usage: Option<Usage>) -> Vec<StreamEvent> {
        self.status = status;
        self.usage = usage;
        let mut events = self.close();
        let kind = match self.status {
            Status::Completed | Status::InProgress => "response.completed",
            Status::Incomplete => "response.incomplete",
            Status::Failed(_) => "response.failed",
        };
        events.push(self.response_event(kind));
        events
    }

    /// The response object of a background response not started yet.
    pub fn queued(&self) -> Response {
        Response {
            status: ResponseStatus::Queued,
            ..self.response()
        }
    }

    /// The response object in its current state.
    pub fn response(&self) -> Response {
        let e = &self.echo;
        let item_status = self.status.of_items();
        let usage = self.usage.map(|u| ResponseUsage {
            input_tokens: u.prompt_tokens.into(),
            input_tokens_details: InputTokensDetails {
                cached_tokens: u.cached_tokens.into(),
            },
            output_tokens: u.completion_tokens.into(),
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: 0,
            },
            total_tokens: u64::from(u.prompt_tokens) + u64::from(u.completion_tokens),
        });
        let (error, incomplete_details) = match &self.status {
            Status::Failed(message) => (
                Some(ResponseError {
                    code: "server_error".into(),
                    message: message.clone(),
                }),
                None,
            ),
            Status::Incomplete => (
                None,
                Some(IncompleteDetails {
                    reason: "max_output_tokens".into(),
                }),
            ),
            _ => (None, None),
        };
        Response {
            id: e.id.clone(),
            object: "response",
            created_at: e.created_at,
            status: self.status.wire(),
            background: e.background,
            error,
            incomplete_details,
            instructions: e.instructions.clone(),
            max_output_tokens: e.max_output_tokens,
            model: e.model.clone(),
            output: self.outputs.iter().map(|o| o.item(item_status)).collect(),
            parallel_tool_calls: e.parallel_tool_calls,
            previous_response_id: e.previous_response_id.clone(),
            reasoning: Reasoning::default(),
            store: e.store,
            temperature: f64::from(e.temperature),
            text: ResponseTextConfig {
                format: e.text_format.clone(),
            },
            tool_choice: e.tool_choice.clone(),
            tools: e.tools.clone(),
            top_p: f64::from(e.top_p),
            truncation: "disabled",
            usage,
            user: e.user.clone(),
            metadata: e.metadata.clone(),
            service_tier: e.service_tier,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

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
            tools: Vec::new(),
            tool_choice: ToolChoiceEcho::Mode("auto".into()),
            parallel_tool_calls: true,
            text_format: json!({"type": "text"}),
            previous_response_id: None,
            store: true,
            metadata: Map::new(),
            user: None,
            service_tier: ServiceTier::Default,
            background: false,
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
        let kinds: Vec<&str> = events.iter().map(|e| e.kind).collect();
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
        for (i, e) in events.iter().enumerate() {
            assert_eq!(
                serde_json::to_value(e).unwrap()["sequence_number"],
                json!(i)
            );
        }
        let r = serde_json::to_value(b.response()).unwrap();
        assert_eq!(r["output"][0]["content"][0]["text"], "Let me check.");
        assert_eq!(r["output"][1]["arguments"], "{\"a\":1}");
        assert_eq!(r["output"][1]["call_id"], "call_1");
        assert_eq!(r["usage"]["total_tokens"], 12);
    }
}
