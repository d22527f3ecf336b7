//! The continuous-batching engine: one thread per loaded model that owns the model and runs
//! every step as one ragged forward pass over all running sequences.
//!
//! Requests arrive through a bounded queue (a full queue is an immediate [`Error::QueueFull`]),
//! each with its own reply channel. Every step the scheduler
//! 1. drops sequences whose client went away (their KV memory is freed in the same step),
//! 2. admits waiting sequences in weighted-fair order between tenants (customers; [`crate::fair`])
//!    while the KV-cache budget allows (a sequence reserves the KV
//!    memory of its prompt plus its `max_tokens`, so a running sequence never runs out); a
//!    prompt that shares a prefix with a recently finished one starts from a copy of that
//!    prompt's KV (the prefix cache, bounded in bytes) instead of prefilling it again,
//!    Beyond `max_running`, only a tenant below its fair share of the batch is admitted, so a
//!    burst from one customer cannot make another wait for a free slot; a tenant over its share
//!    is passed over, not waited for. A request whose customer has nothing running while others
//!    do is started in a forward pass before one of the layers of the step in flight (the next
//!    step's first layer when it arrives between steps), batched with the other newcomers
//!    that arrived meanwhile: one such pass at most every [`EngineConfig::interleave_every`]
//!    steps (a pass reads the weights again; when newcomers are many, most join the next step),
//!    at one of [`EngineConfig::interleave_passes`] evenly spaced layers, its prompts at most
//!    what the step leaves of its token budget, so its prompt is prefilled and its first token sent after a fraction of another
//!    customer's step, not the whole step, and the running sequences' steps grow by a bounded
//!    amount,
//! 3. builds one batch of at most `max_running` sequences, each tenant getting its weighted
//!    max-min fair share (a lone tenant gets every slot; a tenant over its share takes turns):
//!    one decode token per generating sequence, then prompt chunks of the
//!    prefilling sequences up to the step's token budget (chunked prefill: a long prompt cannot
//!    stall everyone's decode); while few sequences decode, each may add a draft of the tokens
//!    it expects next (from its prediction or its own prompt and output, [`speculate`]),
//!    whose positions the pass scores too, so one step can yield several tokens,
//! 4. samples (only among the tokens a sequence's grammar allows, when it has one),
//!    detokenizes, matches stop strings and streams the deltas back; a draft's positions are
//!    sampled in order, each as if decoded alone, while the token sampled is the draft's
//!    next (so the output is the one without drafts), and the rejected positions leave the
//!    KV cache.
//!
//! It does not tokenize prompts (callers do that off the async threads) and knows nothing of
//! HTTP or billing.

mod admission;
mod desk;
mod intake;
mod late;
mod preempt;
mod prefix_cache;
mod sequence;
mod speculate;
#[cfg(test)]
mod tests;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub use self::late::Trigger;
use self::worker::Worker;
pub use crate::classes::ServiceClass;
use crate::constraint::Constraint;
use crate::fair::Tenant;
use crate::model::{LlamaConfig, LlamaModel, LoraAdapter};
use crate::sampling::SamplingParams;
use crate::tokenizer::ModelTokenizer;
use crate::{Error, Result};

/// Limits of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests that may wait for admission; beyond this, submission fails at once.
    pub max_queue: usize,
    /// Tokens one forward pass may process (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// KV-cache memory all running sequences may reserve together.
    pub kv_cache_bytes: usize,
    /// Upper bound of sequences running at once.
    pub max_running: usize,
    /// Sequences one forward pass takes at most (the others take turns, least recently run
    /// first, by the tenants' fair shares): a shorter step delays another request's first
    /// token less, a longer one makes more tokens per second.
    pub max_step_sequences: usize,
    /// KV memory the prefix cache may keep for finished prompts (0 turns it off).
    pub prefix_cache_bytes: usize,
    /// Points of a step (evenly spaced layers, the first included) where the intake looks for
    /// newcomers, requests whose customer has nothing running, and starts those that arrived
    /// in a forward pass of their own beside the step; a step's passes together prefill at
    /// most `max_batch_tokens` tokens. 0 turns interleaving off: newcomers join the next step
    /// like anyone else. Set per model in models.toml (`backend.interleave_passes`); the
    /// default is 4.
    pub interleave_passes: usize,
    /// How rare passes are: a step runs one only when none of the `interleave_every - 1`
    /// steps before it did (1: every step may). A pass reads the weights a second time, which
    /// the running sequences pay for; rationed, a newcomer who comes while others run alone
    /// (one customer's streams) still starts at the next intake point, while when many
    /// arrive most join the next step, the cheapest place for their prompts. Set per model in
    /// models.toml (`backend.interleave_every`); the default is 8. Figures:
    /// bench/results/interleave-*.json (`bench/interleave.py`).
    pub interleave_every: u64,
    /// A test and benchmark setting: at every `preempt_every`-th step's boundary the
    /// lowest-class running sequence admitted last is preempted (its cache released, to be fed
    /// again when it comes back), whatever waits. 0 (the default): only when a higher class
    /// needs the room ([`preempt`]).
    pub preempt_every: u64,
    /// Longest draft a decoding sequence verifies in one step (speculative decoding without a
    /// draft model, [`speculate`]: from the request's prediction, else from its own prompt and
    /// output); 0 turns speculation off. The output is the same either way.
    pub speculative_draft: usize,
    /// Decoding sequences in a step beyond which none drafts: with that many rows the pass is
    /// already bound by arithmetic, not by reading the weights, and rejected draft positions
    /// would cost the others.
    pub speculative_max_batch: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch_tokens: 512,
            kv_cache_bytes: 1 << 30,
            max_running: 32,
            max_step_sequences: 32,
            prefix_cache_bytes: 128 << 20,
            interleave_passes: 4,
            interleave_every: 8,
            preempt_every: 0,
            speculative_draft: 8,
            speculative_max_batch: 4,
        }
    }
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt_ids: Vec<u32>,
    /// Tokens to generate at most; already checked against the context.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Kept equal to the number of tokens generated so far, as they are sampled (also those
    /// the caller has not read yet), so a caller that goes away can bill exactly.
    pub progress: Option<Arc<AtomicUsize>>,
    /// The grammar the output must follow, if any.
    pub constraint: Option<GenConstraint>,
    /// Who asked (the customer) and their scheduling weight; `None` shares one anonymous
    /// tenant.
    pub tenant: Option<Tenancy>,
    /// Set at admission to the prompt tokens taken from the prefix cache (also reported in
    /// `Finished`), so a caller that goes away can bill them at the cached price.
    pub cached: Option<Arc<AtomicUsize>>,
    /// The output the caller expects, tokenized (OpenAI's Predicted Outputs): drafted where
    /// the output follows it (found again where it leaves it). It never changes the output,
    /// only how many steps it takes; `Finished` counts its tokens accepted and rejected.
    pub prediction: Option<Vec<u32>>,
    /// The LoRA adapter the sequence runs with (loaded for this engine's model), batched with
    /// sequences using other adapters or none; `None`: the base model.
    pub adapter: Option<Arc<LoraAdapter>>,
}

impl GenRequest {
    /// A request for `max_tokens` after `prompt_ids` sampled by `sampling`, with nothing else
    /// asked: no stop strings, no grammar, the anonymous tenant and no counters to keep.
    pub fn new(prompt_ids: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            prompt_ids,
            max_tokens,
            sampling,
            stop: Vec::new(),
            progress: None,
            constraint: None,
            tenant: None,
            cached: None,
            prediction: None,
            adapter: None,
        }
    }
}

/// A request's tenant for fair scheduling, and its class of service.
#[derive(Debug, Clone)]
pub struct Tenancy {
    pub name: Tenant,
    /// Relative share of the engine when tenants compete (1 = equal) within a class.
    pub weight: u32,
    /// Which class the request is served in: a higher class goes first to admission and to a
    /// step's slots ([`crate::classes`]).
    pub class: ServiceClass,
}

/// Compiles the grammar that takes over once a trigger appears: given the text the model wrote
/// between the start of the token where the trigger begins and the trigger, it returns a
/// constraint that accepts those tokens and everything the output may still be.
pub type LateGrammar = Arc<dyn Fn(&str) -> Result<Constraint> + Send + Sync>;

/// How a sequence's output is constrained.
#[derive(Clone)]
pub enum GenConstraint {
    /// From the first generated token (JSON outputs, a forced tool call).
    Now(Box<Constraint>),
    /// Free text until one of `triggers` appears (a tool-call marker the model chose to
    /// write); from then on the grammar `then` builds (the call itself).
    AfterTrigger {
        triggers: Vec<Trigger>,
        then: LateGrammar,
    },
}

impl std::fmt::Debug for GenConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Now(c) => f.debug_tuple("Now").field(c).finish(),
            Self::AfterTrigger { triggers, .. } => f
                .debug_struct("AfterTrigger")
                .field("triggers", triggers)
                .finish_non_exhaustive(),
        }
    }
}

/// Log probability of one token, resolved to its text and bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// The chosen token's logprob and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct LogprobInfo {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end token or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

/// What the engine sends back for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The sequence left the waiting queue and joined the running batch (its prefill starts);
    /// sent once, before any `Delta`.
    Admitted,
    /// New text for one or more tokens; empty while text is held back by a stop-string
    /// prefix. Sent for every sampled token, so `completion_tokens` (tokens generated so far,
    /// this one included) is exact when a client goes away mid-sequence.
    Delta {
        text: String,
        logprobs: Vec<LogprobInfo>,
        completion_tokens: usize,
    },
    /// The last event of a sequence.
    Finished {
        reason: StopReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens taken from the prefix cache instead of being prefilled.
        cached_tokens: usize,
        /// Tokens of the request's prediction verified in a step and found to be the output
        /// there (OpenAI's `accepted_prediction_tokens`), and verified and found not to be
        /// (`rejected_prediction_tokens`: computed, then thrown away). Prediction tokens never
        /// drafted (the output went elsewhere, or ended first) are in neither.
        accepted_prediction_tokens: usize,
        rejected_prediction_tokens: usize,
    },
    /// The sequence failed; nothing follows.
    Failed { message: String },
}

/// Live counters of an engine, readable from any thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub kv_used_bytes: AtomicU64,
    pub kv_reserved_bytes: AtomicU64,
    pub last_batch_size: AtomicU64,
    pub prefill_tokens_total: AtomicU64,
    pub decode_tokens_total: AtomicU64,
    pub steps_total: AtomicU64,
    /// Forward passes (counted in `steps_total` too) that started newcomers between the
    /// layers of another step, so their first tokens did not wait for it to end.
    pub interleaved_steps_total: AtomicU64,
    /// Customers the waiting queue keeps state for (those with requests waiting and a bounded
    /// number of recently served ones): it does not grow with every customer ever seen.
    pub tenants_tracked: AtomicU64,
    /// KV memory held by the prefix cache.
    pub prefix_cache_bytes: AtomicU64,
    /// Prompt tokens taken from the prefix cache instead of being prefilled.
    pub prefix_hit_tokens_total: AtomicU64,
    /// Running sequences that gave their KV back to a higher class's request (each came
    /// back later and went on where it stopped).
    pub preemptions_total: AtomicU64,
    /// Preempted sequences waiting to come back.
    pub preempted: AtomicU64,
    /// Draft tokens verified in steps (speculative decoding), and those of them that were the
    /// output.
    pub draft_tokens_total: AtomicU64,
    pub accepted_draft_tokens_total: AtomicU64,
    /// The engine thread has ended (every handle was gone) and dropped its model: the
    /// weights' memory is freed.
    pub stopped: AtomicBool,
}

struct Submission {
    request: GenRequest,
    reply: UnboundedSender<GenEvent>,
}

/// A handle to a running engine; cheap to clone. The thread stops when every handle is gone.
#[derive(Clone)]
pub struct Engine {
    queue: SyncSender<Submission>,
    stats: Arc<EngineStats>,
    config: EngineConfig,
    context_length: usize,
    kv_bytes_per_token: usize,
    /// The model's shape, which a request's adapter must fit.
    model_config: LlamaConfig,
}

impl Engine {
    /// Moves the model onto a new engine thread.
    pub fn start(
        model: LlamaModel,
        tokenizer: Arc<ModelTokenizer>,
        config: EngineConfig,
    ) -> Result<Self> {
        let (queue, incoming) = std::sync::mpsc::sync_channel(config.max_queue.max(1));
        let stats = Arc::new(EngineStats::default());
        let context_length = model.config().context_length;
        let kv_bytes_per_token = model.kv_bytes_per_token();
        let model_config = model.config().clone();
        let worker = Worker::new(model, tokenizer, config.clone(), incoming, stats.clone());
        let ended = stats.clone();
        std::thread::Builder::new()
            .name("tollgate-engine".into())
            .spawn(move || {
                // `run` consumes the worker: the model is dropped when it returns.
                worker.run();
                ended.stopped.store(true, Ordering::Release);
            })
            .map_err(|e| Error::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            queue,
            stats,
            config,
            context_length,
            kv_bytes_per_token,
            model_config,
        })
    }

    /// Queues a sequence. Fails at once when the queue is full or a request can never fit.
    /// Dropping the returned receiver cancels the sequence.
    pub fn submit(&self, request: GenRequest) -> Result<UnboundedReceiver<GenEvent>> {
        let total = request.prompt_ids.len() + request.max_tokens;
        if request.prompt_ids.is_empty() {
            return Err(Error::InvalidParam {
                param: "prompt",
                message: "the prompt is empty".into(),
            });
        }
        if total > self.context_length {
            return Err(Error::ContextOverflow {
                prompt_tokens: request.prompt_ids.len(),
                max_tokens: request.max_tokens,
                context_length: self.context_length,
            });
        }
        if total * self.kv_bytes_per_token > self.config.kv_cache_bytes {
            return Err(Error::InvalidParam {
                param: "max_tokens",
                message: format!(
                    "prompt of {} tokens plus max_tokens {} needs {} bytes of KV cache, more than this model's budget of {} bytes",
                    request.prompt_ids.len(),
                    request.max_tokens,
                    total * self.kv_bytes_per_token,
                    self.config.kv_cache_bytes
                ),
            });
        }
        request.sampling.validate()?;
        // An adapter of another model would fail the whole step it joined.
        if let Some(adapter) = &request.adapter {
            adapter.check_fits(&self.model_config)?;
        }
        let (reply, events) = unbounded_channel();
        match self.queue.try_send(Submission { request, reply }) {
            Ok(()) => {
                self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                Ok(events)
            }
            Err(TrySendError::Full(_)) => Err(Error::QueueFull {
                capacity: self.config.max_queue,
            }),
            Err(TrySendError::Disconnected(_)) => Err(Error::EngineStopped),
        }
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The counters, kept after the engine is gone (to see `stopped`).
    pub fn stats_handle(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }
}
