//! How engine output becomes the gateway's events: content deltas, and tool calls parsed
//! back into OpenAI-shaped call events.

use tollgate_gateway::backend::{FinishReason, GenerateEvent, LogprobEntry, Usage};
use tollgate_runtime::tools::{CallParser, CallSyntax, Piece};

/// How engine output becomes backend events for one request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    /// Tools were offered: calls become call events.
    pub(super) parse_calls: bool,
    /// How the model writes them.
    pub(super) syntax: CallSyntax,
    /// One named function was forced (OpenAI then answers `finish_reason: "stop"`).
    pub(super) named: bool,
}

/// Turns engine deltas into content deltas and call events.
pub(super) struct Shaper {
    shape: Shape,
    parser: CallParser,
    /// Calls begun so far (the next call's index).
    calls: u32,
}

impl Shaper {
    pub(super) fn new(shape: Shape) -> Self {
        Self {
            shape,
            parser: CallParser::new(shape.syntax),
            calls: 0,
        }
    }

    /// One engine delta: at least one `Delta` (it carries the token count), with the text
    /// that is content, and the call events it carries: a call's id and name as soon as the
    /// name is written, its arguments as they come.
    pub(super) fn delta(
        &mut self,
        text: String,
        logprobs: Vec<LogprobEntry>,
        completion_tokens: u32,
    ) -> Vec<GenerateEvent> {
        if !self.shape.parse_calls {
            return vec![GenerateEvent::Delta {
                text,
                logprobs,
                completion_tokens,
            }];
        }
        let pieces = self.parser.push(&text);
        self.pieces(pieces, logprobs, completion_tokens)
    }

    pub(super) fn pieces(
        &mut self,
        pieces: Vec<Piece>,
        logprobs: Vec<LogprobEntry>,
        completion_tokens: u32,
    ) -> Vec<GenerateEvent> {
        let mut out = Vec::new();
        let mut text = String::new();
        let mut logprobs = Some(logprobs);
        for piece in pieces {
            match piece {
                // Blank lines between calls are not content.
                Piece::Text(t) if self.calls > 0 && t.trim().is_empty() => {}
                Piece::Text(t) => text.push_str(&t),
                Piece::CallStart { name } => {
                    out.push(GenerateEvent::Delta {
                        text: std::mem::take(&mut text),
                        logprobs: logprobs.take().unwrap_or_default(),
                        completion_tokens,
                    });
                    // As OpenAI streams a call: id and name first, then the arguments.
                    out.push(GenerateEvent::ToolCallDelta {
                        index: self.calls,
                        id: Some(call_id()),
                        name: Some(name),
                        arguments: String::new(),
                    });
                    self.calls += 1;
                }
                Piece::Arguments(arguments) => out.push(GenerateEvent::ToolCallDelta {
                    index: self.calls.saturating_sub(1),
                    id: None,
                    name: None,
                    arguments,
                }),
                Piece::CallEnd => {}
            }
        }
        if !text.is_empty() || !out.iter().any(|e| matches!(e, GenerateEvent::Delta { .. })) {
            out.push(GenerateEvent::Delta {
                text,
                logprobs: logprobs.take().unwrap_or_default(),
                completion_tokens,
            });
        }
        out
    }

    /// The end: what the parser held back, then `Finished`.
    pub(super) fn finished(&mut self, reason: FinishReason, usage: Usage) -> Vec<GenerateEvent> {
        let mut out = Vec::new();
        if self.shape.parse_calls {
            let rest = self.parser.finish();
            if !rest.is_empty() {
                out = self.pieces(rest, Vec::new(), usage.completion_tokens);
            }
        }
        let reason = if self.calls > 0 && !self.shape.named && reason == FinishReason::Stop {
            FinishReason::ToolCalls
        } else {
            reason
        };
        out.push(GenerateEvent::Finished { reason, usage });
        out
    }
}

/// A call id as OpenAI writes them: `call_` and 24 letters and digits.
fn call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}
