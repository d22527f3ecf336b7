//! One fold of a request's backend events, shared by the streamed and the non-streamed answer:
//! it feeds the accounting guard (tokens as they come, each choice's finish and usage), keeps
//! what the non-streamed answer is built from, and says what each event adds to a stream.

use futures::stream::{select_all, Stream, StreamExt};

use crate::api::accounting::Completion;
use crate::api::openai::CompletionUsage;
use crate::backend::{BackendError, EventStream, FinishReason, GenerateEvent, LogprobEntry, Usage};
use crate::error::ApiError;
use tollgate_metering::kinds::Outcome;
use tollgate_metering::kinds::ServiceTier;

/// One choice's full result (kept for the non-streamed answer).
#[derive(Default)]
pub(super) struct ChoiceResult {
    pub text: String,
    pub logprobs: Vec<LogprobEntry>,
    /// Calls by index: id, name, arguments text.
    pub tool_calls: Vec<(String, String, String)>,
    pub finish: Option<FinishReason>,
    pub usage: Usage,
}

impl ChoiceResult {
    /// Adds one streamed part of call `index`.
    fn on_tool_call(&mut self, index: u32, id: Option<String>, name: Option<String>, args: &str) {
        let Ok(index) = usize::try_from(index) else {
            return;
        };
        while self.tool_calls.len() <= index {
            self.tool_calls.push(Default::default());
        }
        let call = &mut self.tool_calls[index];
        if let Some(id) = id {
            call.0 = id;
        }
        if let Some(name) = name {
            call.1 = name;
        }
        call.2.push_str(args);
    }
}

/// What one backend event adds to a streamed answer.
pub(super) enum Step {
    /// Nothing to send: a sequence started, a delta is held back (a stop-string prefix), or
    /// the fold keeps the event for the answer it builds at the end.
    Quiet,
    Text {
        text: String,
        logprobs: Vec<LogprobEntry>,
    },
    ToolCall {
        call: u32,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
    Finished(FinishReason),
}

/// The events of every choice's backend stream, tagged with the choice's index.
pub(super) fn merged(
    streams: Vec<EventStream>,
) -> impl Stream<Item = (usize, Result<GenerateEvent, BackendError>)> {
    select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |e| (i, e))),
    )
}

pub(super) struct Fold {
    completion: Completion,
    choices: Vec<ChoiceResult>,
    /// Keep text, logprobs and calls (a non-streamed answer); a stream sends them on instead.
    keep: bool,
}

impl Fold {
    pub(super) fn new(completion: Completion, choices: usize, keep: bool) -> Self {
        Self {
            completion,
            choices: (0..choices).map(|_| ChoiceResult::default()).collect(),
            keep,
        }
    }

    /// Accounts one event of choice `index`. A backend error ends the request: it is
    /// recorded as failed (never charged) and returned as the client's error.
    pub(super) async fn apply(
        &mut self,
        index: usize,
        event: Result<GenerateEvent, BackendError>,
    ) -> Result<Step, ApiError> {
        let choice = &mut self.choices[index];
        match event {
            Ok(GenerateEvent::Started { prompt_tokens }) => {
                self.completion.on_started();
                choice.usage.prompt_tokens = prompt_tokens;
                Ok(Step::Quiet)
            }
            Ok(GenerateEvent::Delta {
                text,
                logprobs,
                completion_tokens,
            }) => {
                self.completion.on_delta(index, completion_tokens);
                if self.keep {
                    choice.text.push_str(&text);
                    choice.logprobs.extend(logprobs);
                    Ok(Step::Quiet)
                } else if text.is_empty() && logprobs.is_empty() {
                    Ok(Step::Quiet)
                } else {
                    Ok(Step::Text { text, logprobs })
                }
            }
            Ok(GenerateEvent::ToolCallDelta {
                index: call,
                id,
                name,
                arguments,
            }) => {
                if self.keep {
                    choice.on_tool_call(call, id, name, &arguments);
                    Ok(Step::Quiet)
                } else {
                    Ok(Step::ToolCall {
                        call,
                        id,
                        name,
                        arguments,
                    })
                }
            }
            Ok(GenerateEvent::Finished { reason, usage }) => {
                choice.finish = Some(reason);
                choice.usage = usage;
                self.completion.on_finished(index, reason, usage);
                Ok(Step::Finished(reason))
            }
            Err(e) => {
                self.completion.commit(Outcome::Failed).await;
                Err(e.into())
            }
        }
    }

    /// Every stream ended: settles the request, failed if a choice never finished (its engine
    /// went away).
    pub(super) async fn end(&mut self) -> Result<(), ApiError> {
        if self.choices.iter().any(|c| c.finish.is_none()) {
            self.completion.commit(Outcome::Failed).await;
            return Err(ApiError::Internal(
                "the model stopped before finishing".into(),
            ));
        }
        self.completion.commit(Outcome::Completed).await;
        Ok(())
    }

    /// `usage` as the client sees it: the counts the record holds.
    pub(super) fn usage(&self) -> CompletionUsage {
        self.completion.usage()
    }

    /// The tier that served the request (as billed).
    pub(super) fn service_tier(&self) -> ServiceTier {
        self.completion.billed_tier().0
    }

    pub(super) fn into_choices(self) -> Vec<ChoiceResult> {
        let Self { choices, .. } = self;
        choices
    }
}
