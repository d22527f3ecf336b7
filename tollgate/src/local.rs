//! The in-process backend: adapts the runtime's engine to the gateway's [`Backend`] trait, so
//! `tollgate serve` has no HTTP hop between gateway and model.
//!
//! Prompt rendering and tokenization run on the blocking pool, off the async threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tollgate_gateway::backend::{
    Backend, BackendError, EventStream, FinishReason, GenerateEvent, GenerateRequest, LoadReport,
    LogprobEntry, ModelInfo, Prepared, Prompt, TokenLogprob, Usage,
};
use tollgate_runtime::chat_template::ChatTemplate;
use tollgate_runtime::engine::{Engine, GenEvent, GenRequest, StopReason};
use tollgate_runtime::loader::LoadedModel;
use tollgate_runtime::sampling::SamplingParams;
use tollgate_runtime::tokenizer::ModelTokenizer;
use tollgate_runtime::Error as RuntimeError;

/// A model served by an engine in this process.
pub struct LocalBackend {
    info: ModelInfo,
    engine: Engine,
    tokenizer: Arc<ModelTokenizer>,
    template: Arc<ChatTemplate>,
}

impl LocalBackend {
    pub fn start(
        loaded: LoadedModel,
        config: tollgate_runtime::engine::EngineConfig,
        owned_by: String,
    ) -> anyhow::Result<Self> {
        let LoadedModel {
            id,
            model,
            tokenizer,
            template,
        } = loaded;
        let context_length = model.config().context_length;
        let engine = Engine::start(model, tokenizer.clone(), config)?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Self {
            info: ModelInfo {
                id,
                context_length: u32::try_from(context_length).unwrap_or(u32::MAX),
                created,
                owned_by,
            },
            engine,
            tokenizer,
            template: Arc::new(template),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Renders and tokenizes a prompt (CPU work: call it off the async threads).
    pub fn tokenize(
        tokenizer: &ModelTokenizer,
        template: &ChatTemplate,
        prompt: &Prompt,
    ) -> Result<Vec<u32>, RuntimeError> {
        match prompt {
            Prompt::Chat(messages) => {
                let messages: Vec<(String, String)> = messages
                    .iter()
                    .map(|m| {
                        // Templates know `system`; OpenAI's `developer` role means the same.
                        let role = if m.role == "developer" {
                            "system"
                        } else {
                            &m.role
                        };
                        (role.to_string(), m.content.clone())
                    })
                    .collect();
                let text = template.render(&messages, true)?;
                tokenizer.encode(&text, false)
            }
            Prompt::Text(text) => tokenizer.encode(text, true),
        }
    }
}

fn sampling_params(p: &tollgate_gateway::backend::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as usize,
        seed: p.seed,
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        repetition_penalty: p.repetition_penalty,
        logprobs: p.logprobs.map(|k| k as usize),
    }
}

fn backend_error(e: RuntimeError) -> BackendError {
    match e {
        RuntimeError::ContextOverflow { .. } => BackendError::InvalidRequest {
            message: e.to_string(),
            param: Some("max_tokens".into()),
        },
        RuntimeError::InvalidParam { param, .. } => BackendError::InvalidRequest {
            message: e.to_string(),
            param: Some(param.to_string()),
        },
        RuntimeError::Template(_) => BackendError::InvalidRequest {
            message: e.to_string(),
            param: Some("messages".into()),
        },
        RuntimeError::QueueFull { .. } => BackendError::Overloaded {
            retry_after_secs: 1,
        },
        other => BackendError::Internal(other.to_string()),
    }
}

fn logprob(t: tollgate_runtime::engine::TokenLogprob) -> TokenLogprob {
    TokenLogprob {
        token: t.token,
        logprob: t.logprob,
        bytes: t.bytes,
    }
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, BackendError> {
        let tokenizer = self.tokenizer.clone();
        let template = self.template.clone();
        let prompt = request.prompt;
        let prompt_ids =
            tokio::task::spawn_blocking(move || Self::tokenize(&tokenizer, &template, &prompt))
                .await
                .map_err(|e| BackendError::Internal(format!("tokenizer task failed: {e}")))?
                .map_err(backend_error)?;

        let context = self.engine.context_length();
        let prompt_tokens = prompt_ids.len();
        if prompt_tokens >= context {
            return Err(BackendError::InvalidRequest {
                message: format!(
                    "the prompt is {prompt_tokens} tokens long, but model `{}` has a context of {context} tokens",
                    self.info.id
                ),
                param: Some("messages".into()),
            });
        }
        let max_tokens = match request.params.max_tokens {
            Some(m) => m as usize,
            None => context - prompt_tokens,
        };
        let engine = self.engine.clone();
        let sampling = sampling_params(&request.params);
        let stop = request.params.stop.clone();
        let progress = Arc::new(AtomicUsize::new(0));
        let engine_progress = progress.clone();
        let start = move || -> Result<EventStream, BackendError> {
            let receiver = engine
                .submit(GenRequest {
                    prompt_ids,
                    max_tokens,
                    sampling,
                    stop,
                    progress: Some(engine_progress),
                })
                .map_err(backend_error)?;
            Ok(events(receiver, prompt_tokens))
        };
        Ok(Prepared {
            prompt_tokens: prompt_tokens as u32,
            max_tokens: max_tokens as u32,
            start: Box::new(start),
            progress: Some(progress),
        })
    }

    fn load(&self) -> LoadReport {
        let s = self.engine.stats();
        LoadReport {
            running: s.running.load(Ordering::Relaxed) as u32,
            waiting: s.waiting.load(Ordering::Relaxed) as u32,
            kv_cache_used_bytes: s.kv_used_bytes.load(Ordering::Relaxed),
            kv_cache_capacity_bytes: self.engine.config().kv_cache_bytes as u64,
            batch_size: s.last_batch_size.load(Ordering::Relaxed) as u32,
            steps_total: s.steps_total.load(Ordering::Relaxed),
            prefill_tokens_total: s.prefill_tokens_total.load(Ordering::Relaxed),
            decode_tokens_total: s.decode_tokens_total.load(Ordering::Relaxed),
            prefix_cache_bytes: s.prefix_cache_bytes.load(Ordering::Relaxed),
            prefix_hit_tokens_total: s.prefix_hit_tokens_total.load(Ordering::Relaxed),
        }
    }
}

/// The engine's events for one sequence as backend events, after a `Started`.
fn events(receiver: UnboundedReceiver<GenEvent>, prompt_tokens: usize) -> EventStream {
    let started = futures::stream::once(async move {
        Ok(GenerateEvent::Started {
            prompt_tokens: prompt_tokens as u32,
        })
    });
    let events = UnboundedReceiverStream::new(receiver).map(|event| match event {
        GenEvent::Delta {
            text,
            logprobs,
            completion_tokens,
        } => Ok(GenerateEvent::Delta {
            text,
            logprobs: logprobs
                .into_iter()
                .map(|l| LogprobEntry {
                    chosen: logprob(l.chosen),
                    top: l.top.into_iter().map(logprob).collect(),
                })
                .collect(),
            completion_tokens: completion_tokens as u32,
        }),
        GenEvent::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
        } => Ok(GenerateEvent::Finished {
            reason: match reason {
                StopReason::Stop => FinishReason::Stop,
                StopReason::Length => FinishReason::Length,
            },
            usage: Usage {
                prompt_tokens: prompt_tokens as u32,
                completion_tokens: completion_tokens as u32,
            },
        }),
        GenEvent::Failed { message } => Err(BackendError::Internal(message)),
    });
    Box::pin(started.chain(events))
}
