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
//!    burst from one customer cannot make another wait for a free slot,
//! 3. builds one batch of at most `max_running` sequences, each tenant getting its weighted
//!    max-min fair share (a lone tenant gets every slot; a tenant over its share takes turns):
//!    one decode token per generating sequence, then prompt chunks of the
//!    prefilling sequences up to the step's token budget (chunked prefill: a long prompt cannot
//!    stall everyone's decode),
//! 4. samples (only among the tokens a sequence's grammar allows, when it has one),
//!    detokenizes, matches stop strings and streams the deltas back.
//!
//! It does not tokenize prompts (callers do that off the async threads) and knows nothing of
//! HTTP or billing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::constraint::Constraint;
use crate::detokenize::StreamDecoder;
use crate::fair::{shares, FairQueue, Tenant};
use crate::model::{KvCache, LlamaModel, SeqStep};
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::stop::StopMatcher;
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
    /// KV memory the prefix cache may keep for finished prompts (0 turns it off).
    pub prefix_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch_tokens: 512,
            kv_cache_bytes: 1 << 30,
            max_running: 32,
            prefix_cache_bytes: 128 << 20,
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
}

/// A request's tenant for fair scheduling.
#[derive(Debug, Clone)]
pub struct Tenancy {
    pub name: Tenant,
    /// Relative share of the engine when tenants compete (1 = equal).
    pub weight: u32,
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

/// Where a model starts a call in free text. Matched against the output's bytes, control
/// tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The text, anywhere.
    Anywhere(String),
    /// The text as the first thing in the output after whitespace.
    AtStart(String),
}

impl Trigger {
    /// Where the trigger begins in `output`, of which `output[..scanned]` was looked at before
    /// (without a match). `Err(())` when it can no longer appear at all.
    fn find(&self, output: &[u8], scanned: usize) -> std::result::Result<Option<usize>, ()> {
        match self {
            Self::Anywhere(text) => {
                let from = scanned.saturating_sub(text.len().saturating_sub(1));
                Ok(find(&output[from..], text.as_bytes()).map(|at| from + at))
            }
            Self::AtStart(text) => {
                let Some(at) = output.iter().position(|b| !b.is_ascii_whitespace()) else {
                    return Ok(None);
                };
                let (seen, text) = (&output[at..], text.as_bytes());
                if seen.starts_with(text) {
                    Ok(Some(at))
                } else if text.starts_with(seen) {
                    Ok(None)
                } else {
                    Err(())
                }
            }
        }
    }
}

/// The output's bytes as far as a late grammar's triggers were looked for, so that each step
/// scans only the bytes its token added rather than decoding the whole output again.
#[derive(Debug, Default)]
struct TriggerScan {
    bytes: Vec<u8>,
    /// `bytes[..ends[k]]` are the bytes of the first `k + 1` generated tokens.
    ends: Vec<usize>,
}

/// What [`start_late`] found.
enum Late {
    /// No trigger yet.
    Waiting,
    /// No trigger can appear any more (the output began with something else): free text.
    Never,
    /// The grammar that takes over, advanced through the tokens so far.
    Started(Box<Constraint>),
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
    /// KV memory held by the prefix cache.
    pub prefix_cache_bytes: AtomicU64,
    /// Prompt tokens taken from the prefix cache instead of being prefilled.
    pub prefix_hit_tokens_total: AtomicU64,
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
        let worker = Worker {
            model,
            tokenizer,
            config: config.clone(),
            incoming,
            stats: stats.clone(),
            waiting: FairQueue::new(),
            running: Vec::new(),
            steps: 0,
            reserved_bytes: 0,
            prefixes: PrefixCache::new(config.prefix_cache_bytes),
        };
        std::thread::Builder::new()
            .name("tollgate-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| Error::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            queue,
            stats,
            config,
            context_length,
            kv_bytes_per_token,
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

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }
}

/// A sequence admitted to the running set.
struct Sequence {
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Prompt tokens that came from the prefix cache.
    cached: usize,
    /// Sampled tokens; the last one is not yet in the cache.
    generated: Vec<u32>,
    max_tokens: usize,
    cache: KvCache,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    logprobs: bool,
    reply: UnboundedSender<GenEvent>,
    reserved_bytes: usize,
    progress: Option<Arc<AtomicUsize>>,
    constraint: Option<GenConstraint>,
    tenant: Tenant,
    weight: u32,
    /// Where a late grammar's triggers were looked for.
    scan: TriggerScan,
    /// The last step this sequence ran in (the least recent goes first when its tenant is
    /// over its share of the batch).
    last_step: u64,
}

enum Outcome {
    Continue,
    Finished(StopReason),
    /// This sequence alone failed (its grammar); the others go on.
    Failed(String),
}

struct Worker {
    model: LlamaModel,
    tokenizer: Arc<ModelTokenizer>,
    config: EngineConfig,
    incoming: Receiver<Submission>,
    stats: Arc<EngineStats>,
    waiting: FairQueue<Submission>,
    running: Vec<Sequence>,
    /// Steps run so far.
    steps: u64,
    reserved_bytes: usize,
    prefixes: PrefixCache,
}

/// Prompt tokens left to prefill when a prompt starts from a cached prefix (the last one's
/// logits are needed). Every row of a step runs the same arithmetic however prompts are
/// chunked, so a cached prefix gives the same output as prefilling it.
const PREFIX_SUFFIX_MIN: usize = 1;
/// Shortest prefix worth copying.
const PREFIX_MIN: usize = 4;
/// Most prompts kept (lookups compare against each).
const PREFIX_ENTRIES: usize = 64;

/// Prompts of finished sequences with their KV, most recently used first, bounded in bytes.
struct PrefixCache {
    entries: VecDeque<(Vec<u32>, KvCache)>,
    bytes: usize,
    max_bytes: usize,
}

impl PrefixCache {
    fn new(max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Keeps `cache` (holding exactly `prompt`'s KV), evicting the least recently used.
    fn insert(&mut self, prompt: Vec<u32>, cache: KvCache) {
        let size = cache.bytes();
        if size > self.max_bytes {
            return;
        }
        if let Some(i) = self.entries.iter().position(|(p, _)| *p == prompt) {
            if let Some((_, old)) = self.entries.remove(i) {
                self.bytes -= old.bytes();
            }
        }
        self.bytes += size;
        self.entries.push_front((prompt, cache));
        while self.bytes > self.max_bytes || self.entries.len() > PREFIX_ENTRIES {
            match self.entries.pop_back() {
                Some((_, old)) => self.bytes -= old.bytes(),
                None => break,
            }
        }
    }

    /// A new cache with the longest cached prefix of `prompt`, leaving at least
    /// [`PREFIX_SUFFIX_MIN`] tokens to prefill.
    fn lookup(&mut self, prompt: &[u32]) -> Result<Option<KvCache>> {
        let limit = prompt.len().saturating_sub(PREFIX_SUFFIX_MIN);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (p, _))| {
                let shared = p.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                (i, shared.min(limit))
            })
            .max_by_key(|&(i, len)| (len, std::cmp::Reverse(i)));
        let Some((i, len)) = best.filter(|&(_, len)| len >= PREFIX_MIN) else {
            return Ok(None);
        };
        let Some(entry) = self.entries.remove(i) else {
            return Ok(None);
        };
        let copy = entry.1.copy_prefix(len);
        self.entries.push_front(entry);
        copy.map(Some)
    }
}

impl Worker {
    fn run(mut self) {
        loop {
            if !self.receive() {
                return;
            }
            self.drop_cancelled();
            self.admit();
            self.publish_stats();
            if self.running.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "engine step failed; failing the running sequences");
                for seq in self.running.drain(..) {
                    let _ = seq.reply.send(GenEvent::Failed {
                        message: e.to_string(),
                    });
                }
                self.reserved_bytes = 0;
            }
            // Again after the step, so finished sequences show before the engine idles.
            self.publish_stats();
        }
    }

    /// Moves queued submissions into `waiting`; blocks while there is nothing to do.
    /// Returns false when every handle is gone and no work is left.
    fn receive(&mut self) -> bool {
        let idle = self.running.is_empty() && self.waiting.is_empty();
        if idle {
            // Wake periodically so a sender that is gone is noticed without spinning.
            loop {
                match self.incoming.recv_timeout(Duration::from_millis(500)) {
                    Ok(sub) => {
                        self.enqueue(sub);
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            }
        }
        while let Ok(sub) = self.incoming.try_recv() {
            self.enqueue(sub);
        }
        true
    }

    fn drop_cancelled(&mut self) {
        let before = self.running.len();
        let mut freed = 0;
        self.running.retain(|seq| {
            let keep = !seq.reply.is_closed();
            if !keep {
                freed += seq.reserved_bytes;
            }
            keep
        });
        self.reserved_bytes -= freed;
        if before != self.running.len() {
            tracing::debug!(
                cancelled = before - self.running.len(),
                "dropped sequences whose client went away"
            );
        }
        let gone = self.waiting.retain(|sub| !sub.reply.is_closed());
        if gone > 0 {
            self.stats.waiting.fetch_sub(gone as u64, Ordering::Relaxed);
        }
    }

    /// Queues a submission under its tenant, costed by the tokens it may take.
    fn enqueue(&mut self, sub: Submission) {
        let (tenant, weight) = tenancy(&sub.request);
        let cost = (sub.request.prompt_ids.len() + sub.request.max_tokens) as f64;
        self.waiting.push(tenant, weight, cost, sub);
    }

    /// Whether `tenant` may be admitted while the batch is full: it has fewer running
    /// sequences than its fair share of the batch, and the running set stays bounded.
    fn under_share(&self, tenant: &Tenant, weight: u32) -> bool {
        if self.running.len() >= 2 * self.config.max_running {
            return false;
        }
        let demand = tenant_demand(&self.running, Some((tenant, weight)));
        let slots = shares(&demand, self.config.max_running);
        demand
            .iter()
            .zip(&slots)
            .any(|((t, _, running), &slot)| t == tenant && *running <= slot)
    }

    fn admit(&mut self) {
        let per_token = self.model.kv_bytes_per_token();
        while let Some((tenant, front)) = self.waiting.peek() {
            if self.running.len() >= self.config.max_running {
                let (_, weight) = tenancy(&front.request);
                if !self.under_share(&tenant.clone(), weight) {
                    break;
                }
            }
            let need = (front.request.prompt_ids.len() + front.request.max_tokens) * per_token;
            if self.reserved_bytes + need > self.config.kv_cache_bytes {
                break;
            }
            let Some((tenant, sub)) = self.waiting.pop() else {
                break;
            };
            let weight = tenancy(&sub.request).1;
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            let _ = sub.reply.send(GenEvent::Admitted);
            let GenRequest {
                prompt_ids,
                max_tokens,
                sampling,
                stop,
                progress,
                constraint,
                tenant: _,
                cached,
            } = sub.request;
            let logprobs = sampling.logprobs.is_some();
            let sampler = Sampler::new(sampling, &prompt_ids);
            self.reserved_bytes += need;
            let cache = match self.prefixes.lookup(&prompt_ids) {
                Ok(Some(cache)) => {
                    self.stats
                        .prefix_hit_tokens_total
                        .fetch_add(cache.len() as u64, Ordering::Relaxed);
                    cache
                }
                Ok(None) => self.model.new_cache(),
                Err(e) => {
                    tracing::warn!(error = %e, "prefix cache copy failed; prefilling in full");
                    self.model.new_cache()
                }
            };
            if let Some(c) = &cached {
                c.store(cache.len(), Ordering::Relaxed);
            }
            self.running.push(Sequence {
                prefilled: cache.len(),
                cached: cache.len(),
                generated: Vec::new(),
                max_tokens,
                cache,
                sampler,
                decoder: StreamDecoder::new(self.tokenizer.clone()),
                stop: StopMatcher::new(stop),
                logprobs,
                reply: sub.reply,
                reserved_bytes: need,
                prompt: prompt_ids,
                progress,
                constraint,
                tenant,
                weight,
                scan: TriggerScan::default(),
                last_step: 0,
            });
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        s.kv_reserved_bytes
            .store(self.reserved_bytes as u64, Ordering::Relaxed);
        let used: usize = self.running.iter().map(|q| q.cache.bytes()).sum();
        s.kv_used_bytes.store(used as u64, Ordering::Relaxed);
        s.prefix_cache_bytes
            .store(self.prefixes.bytes as u64, Ordering::Relaxed);
    }

    /// Which running sequences take part in this step: all of them while they fit the
    /// batch; else each tenant's fair share, its least recently run sequences first.
    fn choose(&self) -> Vec<bool> {
        let n = self.running.len();
        if n <= self.config.max_running {
            return vec![true; n];
        }
        let demand = tenant_demand(&self.running, None);
        let slots = shares(&demand, self.config.max_running);
        let mut chosen = vec![false; n];
        for ((tenant, _, _), &slot) in demand.iter().zip(&slots) {
            let mut mine: Vec<usize> = (0..n)
                .filter(|&i| &self.running[i].tenant == tenant)
                .collect();
            mine.sort_by_key(|&i| (self.running[i].last_step, i));
            for &i in mine.iter().take(slot) {
                chosen[i] = true;
            }
        }
        chosen
    }

    /// One forward pass over the running sequences, then sampling and streaming.
    fn step(&mut self) -> Result<()> {
        let mut budget = self.config.max_batch_tokens.max(1);
        self.steps += 1;
        let chosen = self.choose();
        // Decode tokens first (one each), then prompt chunks in admission order.
        let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (seq index, start, len) of input
        for (i, seq) in self.running.iter().enumerate() {
            if !chosen[i] {
                continue;
            }
            if seq.prefilled == seq.prompt.len() && budget > 0 {
                plan.push((i, 0, 1));
                budget -= 1;
            }
        }
        for (i, seq) in self.running.iter().enumerate() {
            let left = seq.prompt.len() - seq.prefilled;
            if chosen[i] && left > 0 && budget > 0 {
                let len = left.min(budget);
                plan.push((i, seq.prefilled, len));
                budget -= len;
            }
        }
        plan.sort_by_key(|p| p.0);
        for &(i, _, _) in &plan {
            self.running[i].last_step = self.steps;
        }

        let mut prefill_tokens = 0usize;
        let mut decode_tokens = 0usize;
        let mut wants = Vec::with_capacity(plan.len());
        {
            // Borrow each planned sequence's cache mutably, once, in index order.
            let mut steps: Vec<SeqStep<'_>> = Vec::with_capacity(plan.len());
            let mut plan_iter = plan.iter().peekable();
            for (i, seq) in self.running.iter_mut().enumerate() {
                let Some(&&(pi, start, len)) = plan_iter.peek() else {
                    break;
                };
                if pi != i {
                    continue;
                }
                plan_iter.next();
                let (tokens, want): (&[u32], bool) = if seq.prefilled < seq.prompt.len() {
                    prefill_tokens += len;
                    let end = start + len;
                    (&seq.prompt[start..end], end == seq.prompt.len())
                } else {
                    decode_tokens += 1;
                    let n = seq.generated.len();
                    (&seq.generated[n - 1..n], true)
                };
                wants.push((
                    i,
                    want,
                    if seq.prefilled < seq.prompt.len() {
                        len
                    } else {
                        0
                    },
                ));
                steps.push(SeqStep {
                    tokens,
                    cache: &mut seq.cache,
                    want_logits: want,
                });
            }
            let logits = self.model.forward(&mut steps)?;
            drop(steps);
            self.stats
                .last_batch_size
                .store(wants.len() as u64, Ordering::Relaxed);
            self.stats
                .prefill_tokens_total
                .fetch_add(prefill_tokens as u64, Ordering::Relaxed);
            self.stats
                .decode_tokens_total
                .fetch_add(decode_tokens as u64, Ordering::Relaxed);
            self.stats.steps_total.fetch_add(1, Ordering::Relaxed);

            let mut logits = logits.into_iter();
            let mut finished: Vec<(usize, Outcome)> = Vec::new();
            for &(i, want, prefill_len) in &wants {
                self.running[i].prefilled += prefill_len;
                if !want {
                    continue;
                }
                let Some(mut row) = logits.next() else {
                    return Err(Error::Weights(
                        "the forward pass returned fewer logit rows than requested".into(),
                    ));
                };
                let outcome = self.advance(i, &mut row)?;
                finished.push((i, outcome));
            }
            // Remove finished sequences, highest index first so indices stay valid.
            finished.sort_by_key(|f| std::cmp::Reverse(f.0));
            for (i, outcome) in finished {
                if let Outcome::Failed(message) = outcome {
                    let seq = self.running.remove(i);
                    self.reserved_bytes -= seq.reserved_bytes;
                    let _ = seq.reply.send(GenEvent::Failed { message });
                    continue;
                }
                if let Outcome::Finished(reason) = outcome {
                    // `remove`, not `swap_remove`: admission order is the prefill order.
                    let seq = self.running.remove(i);
                    self.reserved_bytes -= seq.reserved_bytes;
                    if self.prefixes.max_bytes > 0 {
                        match seq.cache.copy_prefix(seq.prompt.len()) {
                            Ok(cache) => {
                                self.prefixes.insert(seq.prompt.clone(), cache);
                                // Before `Finished` goes out, so a caller sees it at once.
                                self.stats
                                    .prefix_cache_bytes
                                    .store(self.prefixes.bytes as u64, Ordering::Relaxed);
                            }
                            Err(e) => tracing::warn!(error = %e, "prefix cache copy failed"),
                        }
                    }
                    let _ = seq.reply.send(GenEvent::Finished {
                        reason,
                        prompt_tokens: seq.prompt.len(),
                        completion_tokens: seq.generated.len(),
                        cached_tokens: seq.cached,
                    });
                }
            }
        }
        Ok(())
    }

    /// Samples the next token of sequence `i` from `logits` and streams its text. A grammar
    /// failure fails this sequence only.
    fn advance(&mut self, i: usize, logits: &mut [f32]) -> Result<Outcome> {
        match self.advance_inner(i, logits) {
            Err(Error::Grammar(message)) => {
                tracing::warn!(error = %message, "constrained sequence failed");
                Ok(Outcome::Failed(format!("structured output: {message}")))
            }
            other => other,
        }
    }

    fn advance_inner(&mut self, i: usize, logits: &mut [f32]) -> Result<Outcome> {
        let context = self.model.config().context_length;
        let tokenizer = self.tokenizer.clone();
        let seq = &mut self.running[i];
        if let Some(GenConstraint::Now(c)) = &mut seq.constraint {
            c.mask(logits)?;
        }
        let sampled: Sampled = seq.sampler.sample(logits);
        let token = sampled.token;
        seq.generated.push(token);
        let mut grammar_done = false;
        match &mut seq.constraint {
            Some(GenConstraint::Now(c)) if !tokenizer.stop_token_ids().contains(&token) => {
                c.commit(token)?;
                grammar_done = c.is_finished();
            }
            Some(GenConstraint::Now(_)) => {}
            Some(GenConstraint::AfterTrigger { triggers, then }) => {
                match start_late(&tokenizer, &mut seq.scan, &seq.generated, triggers, then) {
                    Ok(Late::Waiting) => {}
                    Ok(Late::Never) => seq.constraint = None,
                    Ok(Late::Started(c)) => {
                        grammar_done = c.is_finished();
                        seq.constraint = Some(GenConstraint::Now(c));
                    }
                    // The tokens that carried the marker already left the grammar (the model
                    // wrote something else right after it): the output stays free text, and
                    // the caller's parser returns it as text.
                    Err(e) => {
                        tracing::warn!(error = %e, "late grammar did not accept the output so far");
                        seq.constraint = None;
                    }
                }
            }
            None => {}
        }
        let logprobs = if seq.logprobs {
            vec![LogprobInfo {
                chosen: resolve(&tokenizer, token, sampled.logprob),
                top: sampled
                    .top
                    .iter()
                    .map(|&(t, lp)| resolve(&tokenizer, t, lp))
                    .collect(),
            }]
        } else {
            Vec::new()
        };
        if tokenizer.stop_token_ids().contains(&token) {
            // The end token itself is counted (the model produced it) but never shown.
            let rest = seq.decoder.finish()?;
            let tail = seq.stop.push(&rest);
            let mut text = tail.emit;
            if !tail.stopped {
                text.push_str(&seq.stop.finish());
            }
            send(seq, text, logprobs);
            return Ok(Outcome::Finished(StopReason::Stop));
        }
        let piece = seq.decoder.push(token)?;
        let outcome = seq.stop.push(&piece);
        if outcome.stopped {
            send(seq, outcome.emit, logprobs);
            return Ok(Outcome::Finished(StopReason::Stop));
        }
        let mut text = outcome.emit;
        let at_limit = seq.generated.len() >= seq.max_tokens
            || seq.prompt.len() + seq.generated.len() >= context;
        if at_limit || grammar_done {
            let rest = seq.decoder.finish()?;
            let tail = seq.stop.push(&rest);
            text.push_str(&tail.emit);
            if tail.stopped {
                send(seq, text, logprobs);
                return Ok(Outcome::Finished(StopReason::Stop));
            }
            text.push_str(&seq.stop.finish());
            send(seq, text, logprobs);
            // A complete grammar is a natural end, even on the last allowed token.
            let reason = if grammar_done {
                StopReason::Stop
            } else {
                StopReason::Length
            };
            return Ok(Outcome::Finished(reason));
        }
        send(seq, text, logprobs);
        Ok(Outcome::Continue)
    }
}

/// A request's tenant and weight (requests without one share the anonymous tenant).
fn tenancy(request: &GenRequest) -> (Tenant, u32) {
    match &request.tenant {
        Some(t) => (t.name.clone(), t.weight.max(1)),
        None => (Tenant::from(""), 1),
    }
}

/// `(tenant, weight, running sequences)` of the running set, in first-seen order, with
/// `extra` counted as one more sequence of its tenant.
fn tenant_demand(running: &[Sequence], extra: Option<(&Tenant, u32)>) -> Vec<(Tenant, u32, usize)> {
    let mut demand: Vec<(Tenant, u32, usize)> = Vec::new();
    let entries = running.iter().map(|s| (&s.tenant, s.weight)).chain(extra);
    for (tenant, weight) in entries {
        match demand.iter_mut().find(|(t, _, _)| t == tenant) {
            Some(entry) => entry.2 += 1,
            None => demand.push((tenant.clone(), weight, 1)),
        }
    }
    demand
}

/// When the generated text shows one of `triggers` (the first, when several), the grammar
/// that takes over from there: built from the text between the start of the token where the
/// trigger begins and the trigger, and advanced through the tokens from that one on. `scan`
/// holds what earlier calls saw of `generated`; only the tokens added since are scanned.
fn start_late(
    tokenizer: &ModelTokenizer,
    scan: &mut TriggerScan,
    generated: &[u32],
    triggers: &[Trigger],
    then: &LateGrammar,
) -> Result<Late> {
    let scanned = scan.bytes.len();
    for &t in &generated[scan.ends.len()..] {
        scan.bytes.extend_from_slice(&tokenizer.token_bytes(t));
        scan.ends.push(scan.bytes.len());
    }
    let mut at = None;
    let mut possible = false;
    for t in triggers {
        match t.find(&scan.bytes, scanned) {
            Ok(Some(found)) => at = Some(at.map_or(found, |a: usize| a.min(found))),
            Ok(None) => possible = true,
            Err(()) => {}
        }
    }
    let Some(at) = at else {
        return Ok(if possible { Late::Waiting } else { Late::Never });
    };
    // The token where the trigger begins, and where that token begins.
    let first = scan.ends.iter().position(|&end| end > at).unwrap_or(0);
    let start = first.checked_sub(1).map_or(0, |k| scan.ends[k]);
    let before = String::from_utf8_lossy(&scan.bytes[start..at]);
    let mut c = then(&before)?;
    c.commit_all(&generated[first..])?;
    Ok(Late::Started(Box::new(c)))
}

/// The first position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn send(seq: &Sequence, text: String, logprobs: Vec<LogprobInfo>) {
    if let Some(p) = &seq.progress {
        p.store(seq.generated.len(), Ordering::Relaxed);
    }
    // A closed channel means the client went away; the next step drops the sequence.
    let _ = seq.reply.send(GenEvent::Delta {
        text,
        logprobs,
        completion_tokens: seq.generated.len(),
    });
}

fn resolve(tokenizer: &ModelTokenizer, token: u32, logprob: f32) -> TokenLogprob {
    TokenLogprob {
        token: tokenizer.token_text(token),
        bytes: tokenizer.token_bytes(token),
        logprob,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::constraint::{ConstraintCompiler, Grammar};
    use crate::tools::{self, CallSyntax, ToolSpec};

    fn tokenizer() -> Arc<ModelTokenizer> {
        let path = crate::dev_model::require_dev_model().unwrap();
        let mut f = std::fs::File::open(path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        Arc::new(ModelTokenizer::from_gguf(&content).unwrap())
    }

    fn late(compiler: &Arc<ConstraintCompiler>, syntax: CallSyntax) -> LateGrammar {
        let tools = vec![ToolSpec {
            name: "get_weather".into(),
            description: None,
            parameters: serde_json::json!({
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": false,
            }),
        }];
        let compiler = compiler.clone();
        Arc::new(move |before: &str| {
            compiler.compile(&Grammar::Lark(tools::late_grammar(
                &compiler, syntax, &tools, false, before,
            )))
        })
    }

    /// Feeds `rest` token by token into a late constraint; whether every token was allowed and
    /// the grammar then ended.
    fn completes(tokenizer: &ModelTokenizer, c: &mut Constraint, rest: &str) -> bool {
        let ids = tokenizer.encode(rest, false).unwrap();
        ids.iter().all(|&t| c.commit(t).is_ok()) && c.is_finished()
    }

    #[test]
    fn late_constraints_start_where_each_syntax_starts_a_call() {
        let tokenizer = tokenizer();
        let compiler =
            Arc::new(ConstraintCompiler::new(tokenizer.clone(), tokenizer.vocab_size()).unwrap());
        // The output fed one token at a time, as the engine does: the grammar once a
        // trigger appeared, `None` while none has (or none can any more).
        let start = |syntax: CallSyntax, text: &str| {
            let generated = tokenizer.encode(text, false).unwrap();
            let mut scan = TriggerScan::default();
            let mut found = None;
            for k in 1..=generated.len() {
                let then = late(&compiler, syntax);
                match start_late(
                    &tokenizer,
                    &mut scan,
                    &generated[..k],
                    &syntax.triggers(),
                    &then,
                )
                .unwrap()
                {
                    Late::Waiting => {}
                    Late::Never => return None,
                    Late::Started(c) => {
                        // The rest of the output goes to the grammar, as in the engine.
                        let mut c = *c;
                        for &t in &generated[k..] {
                            c.commit(t).unwrap();
                        }
                        found = Some(c);
                        break;
                    }
                }
            }
            found
        };
        // A trigger that appears later than the first scanned tokens is found as well when
        // the tokens arrive one at a time.
        let generated = tokenizer
            .encode("Let me check.\n<tool_call>\n{", false)
            .unwrap();
        let mut scan = TriggerScan::default();
        let then = late(&compiler, CallSyntax::Hermes);
        let triggers = CallSyntax::Hermes.triggers();
        let steps: Vec<bool> = (1..=generated.len())
            .map(|k| {
                matches!(
                    start_late(&tokenizer, &mut scan, &generated[..k], &triggers, &then).unwrap(),
                    Late::Started(_)
                )
            })
            .collect();
        // Found once, at the token that completes the marker (the engine then switches to the
        // grammar and scans no more).
        assert_eq!(steps.iter().filter(|&&s| s).count(), 1, "{steps:?}");
        let k = steps.iter().position(|&s| s).unwrap();
        let text = tokenizer.decode(&generated[..=k], false).unwrap();
        assert!(text.ends_with("<tool_call>"), "{text:?}");
        let text = tokenizer.decode(&generated[..k], false).unwrap();
        assert!(!text.contains("<tool_call>"), "{text:?}");
        // Llama 3's trigger must open the answer: once the answer began with prose, it can
        // never start, and the engine drops the late grammar.
        let generated = tokenizer.encode("It is sunny", false).unwrap();
        let mut scan = TriggerScan::default();
        let then = late(&compiler, CallSyntax::Llama3Json);
        assert!(matches!(
            start_late(
                &tokenizer,
                &mut scan,
                &generated,
                &CallSyntax::Llama3Json.triggers(),
                &then
            )
            .unwrap(),
            Late::Never
        ));

        // Hermes: the marker anywhere, prose before it included.
        assert!(start(CallSyntax::Hermes, "Let me check the weather").is_none());
        let mut c = start(
            CallSyntax::Hermes,
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci",
        )
        .unwrap();
        assert!(completes(
            &tokenizer,
            &mut c,
            "ty\": \"Paris\"}}\n</tool_call>"
        ));

        // Llama 3: a brace that opens the answer, leading whitespace allowed; not one later.
        assert!(start(CallSyntax::Llama3Json, "It is {sunny} in Paris").is_none());
        let mut c = start(
            CallSyntax::Llama3Json,
            " {\"name\": \"get_weather\", \"parameters\": {\"ci",
        )
        .unwrap();
        assert!(completes(&tokenizer, &mut c, "ty\": \"Paris\"}}"));
        // Once started, the call is held to the schema: Hermes' key is not allowed.
        let mut c = start(CallSyntax::Llama3Json, "{\"name\": \"get_weather\", \"").unwrap();
        assert!(!completes(
            &tokenizer,
            &mut c,
            "arguments\": {\"city\": \"Paris\"}}"
        ));
        // A tool that was not offered can never be named.
        let mut c = start(CallSyntax::Llama3Json, "{\"name\": \"").unwrap();
        assert!(!completes(
            &tokenizer,
            &mut c,
            "rm_rf\", \"parameters\": {}}"
        ));
    }
}
