//! The in-process backend: adapts the runtime's engine to the gateway's [`Backend`] trait, so
//! `tollgate serve` has no HTTP hop between gateway and model.
//!
//! Prompt rendering, tokenization and grammar compilation run on the blocking pool, off the
//! async threads. Structured outputs become the engine's constraints; tool calls are shown to
//! the model (by its own template, or the fallback prompt of [`tollgate_runtime::tools`]),
//! constrained while written, and parsed back into OpenAI-shaped call events.

pub mod adapters;
mod grammars;
mod prompt;
mod shaper;

use self::shaper::{Shape, Shaper};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tollgate_gateway::backend::{
    AdapterRef, Backend, BackendError, EventStream, FinishReason, GenerateEvent, GenerateRequest,
    LoadReport, LogprobEntry, ModelInfo, Prepared, Prompt, ResponseFormat, ServiceTier,
    TokenLogprob, ToolChoice, Usage,
};
use tollgate_runtime::chat_template::ChatTemplate;

use tollgate_runtime::engine::{Engine, GenEvent, GenRequest, ServiceClass, StopReason, Tenancy};
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
    grammars: Arc<grammars::Grammars>,
    vocab_size: usize,
    adapters: adapters::Adapters,
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
        let vocab_size = model.config().vocab_size;
        let grammars = grammars::Grammars::start(tokenizer.clone(), vocab_size);
        let adapters = adapters::Adapters::new(model.adapter_base());
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
            grammars,
            vocab_size,
            adapters,
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
        Self::tokenize_with_tools(tokenizer, template, prompt, None)
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
        logit_bias: p.logit_bias.clone(),
    }
}

/// The engine's class for a request served at `tier`.
fn class_of(tier: ServiceTier) -> ServiceClass {
    match tier {
        // A reservation's requests run at priority.
        ServiceTier::Priority | ServiceTier::Reserved => ServiceClass::Priority,
        ServiceTier::Default => ServiceClass::Default,
        ServiceTier::Flex => ServiceClass::Flex,
        ServiceTier::Batch => ServiceClass::Batch,
    }
}

/// `Retry-After` of a `flex` request refused for want of capacity.
const FLEX_RETRY_AFTER_SECS: u64 = 30;

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
        RuntimeError::Constraint { param, message } => BackendError::InvalidRequest {
            message,
            param: Some(param),
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

impl LocalBackend {
    /// The request's prompt (tools shown) and prediction (OpenAI's Predicted Outputs: a draft)
    /// in the model's tokens, on the blocking pool.
    async fn tokenized(
        &self,
        request: &GenerateRequest,
    ) -> Result<(Vec<u32>, Option<Vec<u32>>), BackendError> {
        let tokenizer = self.tokenizer.clone();
        let template = self.template.clone();
        let prompt = request.prompt.clone();
        let tools = request.tools.clone();
        let predicted = request.prediction.clone();
        tokio::task::spawn_blocking(move || {
            let ids = Self::tokenize_with_tools(&tokenizer, &template, &prompt, tools.as_ref())?;
            let prediction = predicted
                .map(|text| tokenizer.encode(&text, false))
                .transpose()?;
            Ok::<_, RuntimeError>((ids, prediction))
        })
        .await
        .map_err(|e| BackendError::Internal(format!("tokenizer task failed: {e}")))?
        .map_err(backend_error)
    }

    /// How the output is read back: tool calls parsed unless `tool_choice` is `none`, in the
    /// template's call syntax.
    fn shape(&self, request: &GenerateRequest) -> Shape {
        Shape {
            // With `tool_choice: "none"` a call-like text is content, as OpenAI never answers
            // a call then.
            parse_calls: request
                .tools
                .as_ref()
                .is_some_and(|t| t.choice != ToolChoice::None),
            syntax: self.template.call_syntax(),
            named: matches!(
                request.tools.as_ref().map(|t| &t.choice),
                Some(ToolChoice::Function(_))
            ),
        }
    }

    /// Refuses `logit_bias` tokens outside the vocabulary and a prompt of `prompt_tokens` that
    /// fills the context; the tokens the request may generate.
    fn check_lengths(
        &self,
        request: &GenerateRequest,
        prompt_tokens: usize,
    ) -> Result<usize, BackendError> {
        if let Some(&(token, _)) = request
            .params
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= self.vocab_size)
        {
            return Err(BackendError::InvalidRequest {
                message: format!(
                    "token {token} in 'logit_bias' is not in the vocabulary of model `{}` ({} tokens)",
                    self.info.id, self.vocab_size
                ),
                param: Some("logit_bias".into()),
            });
        }
        let context = self.engine.context_length();
        if prompt_tokens >= context {
            return Err(BackendError::InvalidRequest {
                message: format!(
                    "the prompt is {prompt_tokens} tokens long, but model `{}` has a context of {context} tokens",
                    self.info.id
                ),
                param: Some("messages".into()),
            });
        }
        Ok(match request.params.max_tokens {
            Some(m) => m as usize,
            None => context - prompt_tokens,
        })
    }
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, BackendError> {
        let (prompt_ids, prediction) = self.tokenized(&request).await?;
        let compiler = if request.response_format != ResponseFormat::Text || request.tools.is_some()
        {
            let grammars = self.grammars.clone();
            let compiler = tokio::task::spawn_blocking(move || grammars.compiler())
                .await
                .map_err(|e| BackendError::Internal(format!("grammar task failed: {e}")))?
                .map_err(backend_error)?;
            Some(compiler)
        } else {
            None
        };
        let constraint = self
            .constraint(compiler.as_ref(), &request)
            .map_err(backend_error)?;
        let adapter = match &request.adapter {
            Some(r) => Some(self.adapters.get(r).await?),
            None => None,
        };
        // Customers share the engine fairly (weighted fair queueing between them).
        let tenant = request.customer.as_ref().map(|c| Tenancy {
            name: Arc::from(c.as_str()),
            weight: request.scheduling_weight.unwrap_or(1),
            class: class_of(request.service_tier),
        });
        let max_wait = request.max_queue_wait;
        let shape = self.shape(&request);
        let prompt_tokens = prompt_ids.len();
        let max_tokens = self.check_lengths(&request, prompt_tokens)?;
        let engine = self.engine.clone();
        let sampling = sampling_params(&request.params);
        let stop = request.params.stop.clone();
        let progress = Arc::new(AtomicUsize::new(0));
        let engine_progress = progress.clone();
        let cached = Arc::new(AtomicUsize::new(0));
        let engine_cached = cached.clone();
        // The request's span: the phases' spans are its children (the stream is read after
        // the handler has returned).
        let parent = tracing::Span::current();
        let start = move || -> Result<EventStream, BackendError> {
            let queue = phase(&parent, "queue");
            let receiver = engine
                .submit(GenRequest {
                    prompt_ids,
                    max_tokens,
                    sampling,
                    stop,
                    progress: Some(engine_progress),
                    constraint,
                    tenant,
                    cached: Some(engine_cached),
                    prediction,
                    adapter,
                })
                .map_err(backend_error)?;
            Ok(events(
                receiver,
                max_wait,
                prompt_tokens,
                shape,
                (parent, queue),
            ))
        };
        Ok(Prepared {
            prompt_tokens: prompt_tokens as u32,
            max_tokens: max_tokens as u32,
            start: Box::new(start),
            progress: Some(progress),
            cached: Some(cached),
        })
    }

    fn loaded_adapters(&self) -> Vec<AdapterRef> {
        self.adapters.loaded()
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
            interleaved_steps_total: s.interleaved_steps_total.load(Ordering::Relaxed),
            prefill_tokens_total: s.prefill_tokens_total.load(Ordering::Relaxed),
            decode_tokens_total: s.decode_tokens_total.load(Ordering::Relaxed),
            prefix_cache_bytes: s.prefix_cache_bytes.load(Ordering::Relaxed),
            prefix_hit_tokens_total: s.prefix_hit_tokens_total.load(Ordering::Relaxed),
        }
    }
}

/// A span for one phase of a sequence (`queue`, `prefill`, `decode`) under the request's span,
/// when traces are exported.
fn phase(parent: &tracing::Span, name: &'static str) -> tracing::Span {
    tollgate_gateway::server::telemetry::span(
        || tracing::info_span!(parent: parent, "engine.phase", otel.name = name, gen_ai.phase = name),
    )
}

/// The span of the phase a sequence is in, under the request's span: queue until admitted,
/// prefill until the first token, decode until the end. Each ends when the next begins.
struct Phases {
    parent: tracing::Span,
    /// Held for its drop, which ends the phase's span.
    _open: tracing::Span,
    decoding: bool,
}

impl Phases {
    fn on(&mut self, event: &GenEvent) {
        match event {
            GenEvent::Admitted => self._open = phase(&self.parent, "prefill"),
            GenEvent::Delta { .. } if !self.decoding => {
                self.decoding = true;
                self._open = phase(&self.parent, "decode");
            }
            GenEvent::Delta { .. } => {}
            GenEvent::Finished { .. } | GenEvent::Failed { .. } => {
                self._open = tracing::Span::none()
            }
        }
    }
}

/// The engine's first event for a sequence (its admission, or its failure), waited for at most
/// `max_wait` when set: a sequence still queued then is withdrawn (dropping the receiver takes
/// it out of the queue) and refused for want of capacity.
async fn admission(
    mut receiver: UnboundedReceiver<GenEvent>,
    max_wait: Option<std::time::Duration>,
) -> Result<(Option<GenEvent>, UnboundedReceiver<GenEvent>), BackendError> {
    let first = match max_wait {
        Some(wait) => tokio::time::timeout(wait, receiver.recv())
            .await
            .map_err(|_| BackendError::NoCapacity {
                retry_after_secs: FLEX_RETRY_AFTER_SECS,
            })?,
        None => receiver.recv().await,
    };
    Ok((first, receiver))
}

/// The engine's events for one sequence as backend events, after a `Started` sent when the
/// engine admits it (so the time to `Started` is its queue wait); `phases` is the request's span
/// and the queue phase's.
fn events(
    receiver: UnboundedReceiver<GenEvent>,
    max_wait: Option<std::time::Duration>,
    prompt_tokens: usize,
    shape: Shape,
    phases: (tracing::Span, tracing::Span),
) -> EventStream {
    let phases = Phases {
        parent: phases.0,
        _open: phases.1,
        decoding: false,
    };
    // Taken by the one item the admission yields.
    let mut phases = Some(phases);
    let admitted = futures::stream::once(admission(receiver, max_wait));
    Box::pin(
        admitted.flat_map(move |admitted| match (admitted, phases.take()) {
            (Err(e), _) => futures::stream::iter([Err(e)]).boxed(),
            (Ok((first, rest)), Some(phases)) => {
                let started = Ok(GenerateEvent::Started {
                    prompt_tokens: prompt_tokens as u32,
                });
                let engine = futures::stream::iter(first).chain(UnboundedReceiverStream::new(rest));
                futures::stream::iter([started])
                    .chain(shaped(engine, shape, phases))
                    .boxed()
            }
            (Ok(_), None) => futures::stream::empty().boxed(),
        }),
    )
}

/// The engine's events shaped into backend events (text, tool calls, the finish).
fn shaped(
    engine: impl futures::Stream<Item = GenEvent> + Send + 'static,
    shape: Shape,
    mut phases: Phases,
) -> impl futures::Stream<Item = Result<GenerateEvent, BackendError>> + Send + 'static {
    let mut shaper = Shaper::new(shape);
    engine.flat_map(move |event| {
        phases.on(&event);
        let out: Vec<Result<GenerateEvent, BackendError>> = match event {
            GenEvent::Admitted => Vec::new(),
            GenEvent::Delta {
                text,
                logprobs,
                completion_tokens,
            } => shaper
                .delta(
                    text,
                    logprobs
                        .into_iter()
                        .map(|l| LogprobEntry {
                            chosen: logprob(l.chosen),
                            top: l.top.into_iter().map(logprob).collect(),
                        })
                        .collect(),
                    completion_tokens as u32,
                )
                .into_iter()
                .map(Ok)
                .collect(),
            GenEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                accepted_prediction_tokens,
                rejected_prediction_tokens,
            } => shaper
                .finished(
                    match reason {
                        StopReason::Stop => FinishReason::Stop,
                        StopReason::Length => FinishReason::Length,
                    },
                    Usage {
                        prompt_tokens: prompt_tokens as u32,
                        completion_tokens: completion_tokens as u32,
                        cached_tokens: cached_tokens as u32,
                        accepted_prediction_tokens: accepted_prediction_tokens as u32,
                        rejected_prediction_tokens: rejected_prediction_tokens as u32,
                        ..Usage::default()
                    },
                )
                .into_iter()
                .map(Ok)
                .collect(),
            GenEvent::Failed { message } => vec![Err(BackendError::Internal(message))],
        };
        futures::stream::iter(out)
    })
}
