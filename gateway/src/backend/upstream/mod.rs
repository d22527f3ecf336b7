//! Backends over HTTP: a pool of Tollgate workers or of any OpenAI-compatible server (vLLM,
//! TGI, llama.cpp's server), spoken to with the OpenAI streaming API.
//!
//! Routing: each request goes to the healthy member with the fewest requests in flight, or
//! with [`Routing::Customer`] to its customer's own member (rendezvous hashing of customer and
//! member, so every gateway replica picks the same one and a member's leaving moves only its
//! own customers) unless that member carries more than its share of the load (consistent
//! hashing with bounded loads): a customer's repeated system prompts and tools then meet the
//! prefix cache that holds them. A background task probes every member's `/health`; a member that fails a request before its
//! first token, or a probe, is ejected and readmitted when a probe succeeds again. A request
//! that fails before its first token is retried on another member; once text has streamed,
//! a failure ends the response with an error event and the tokens seen so far are billed.
//!
//! Members are the configured URLs, or with [`Discovery::Dns`] every address their host names
//! resolve to, resolved again before each probe round: a Kubernetes headless Service lists its
//! Ready pods, so workers can be scaled without touching the gateway.
//!
//! Token counts come from the upstream's `usage` (`stream_options.include_usage`), cached
//! prompt tokens from its `prompt_tokens_details.cached_tokens`; output is never billed below
//! what the gateway saw stream by, so an upstream that omits or zeroes `completion_tokens`, or
//! whose stream is cut, cannot under-bill (the record then says `observed`). What streamed by
//! is counted with the model's tokenizer when the catalogue gives the model a `source` (each
//! chunk's text and call arguments, at least one token per chunk), else one token per chunk.
//!
//! A request with a LoRA adapter (pools of `tollgate worker`s only) goes to a member that holds
//! the adapter when one is healthy and under the load bound, else as any other request; the
//! member picked is told the adapter and loads it (`adapters`).
//!
//! This file is the pool and its members; `health` discovers and probes them, `failover` tries
//! them in turn, `chat` speaks the chat and completions API to them, `responses` relays the
//! Responses API, `adapters` names adapters to workers and prefers the members holding them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{json, Value};

mod adapters;
mod chat;
mod chunk;
mod failover;
mod health;
mod responses;
mod sse;

use crate::backend::{
    adapter_key, Backend, BackendError, GenerateRequest, ModelInfo, PassthroughStream, Prepared,
    Start, TokenCounter,
};
use crate::config::ResponsesMode;
pub use crate::config::{Discovery, Routing};
pub use adapters::{forwarded as forwarded_adapter, ADAPTER_HEADER, ADAPTER_PATH_HEADER};

/// How often members are probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting and receiving the response head; generation itself has no deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How far above the average a customer's member may be loaded before its requests spill to
/// the next member in the customer's order.
const LOAD_BOUND: f64 = 1.25;

/// Requests in flight a customer's member always takes: below a few concurrent requests a
/// batch costs about the same, while a prefix cache miss costs a whole prefill.
const LOAD_FLOOR: u32 = 4;

/// One upstream server.
#[derive(Debug)]
struct Member {
    /// Base URL without a trailing `/v1`.
    base: String,
    /// The configured URL it came from (an index into the pool's URLs).
    origin: usize,
    in_flight: AtomicU32,
    healthy: AtomicBool,
    /// The URLs of the paths every request goes to, parsed once rather than per request.
    parsed: Vec<(&'static str, reqwest::Url)>,
    /// The LoRA adapters it holds (their keys, `crate::backend::adapter_key`), as its
    /// `/health` last said and as requests it accepted since showed.
    adapters: Mutex<HashSet<String>>,
}

/// The paths of the completions APIs, whose URLs each member parses once.
const PARSED_PATHS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

impl Member {
    fn new(base: String, origin: usize, healthy: bool) -> Arc<Self> {
        let parsed = PARSED_PATHS
            .iter()
            .filter_map(|&path| Some((path, reqwest::Url::parse(&format!("{base}{path}")).ok()?)))
            .collect();
        Arc::new(Self {
            base,
            origin,
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(healthy),
            parsed,
            adapters: Mutex::default(),
        })
    }

    /// A POST of `path` on this member.
    fn post(&self, client: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        match self.parsed.iter().find(|(p, _)| *p == path) {
            Some((_, url)) => client.post(url.clone()),
            None => client.post(format!("{}{path}", self.base)),
        }
    }
}

/// The current members; replaced whole when discovery finds a change.
#[derive(Debug, Default)]
struct MemberSet(RwLock<Arc<Vec<Arc<Member>>>>);

impl MemberSet {
    fn current(&self) -> Arc<Vec<Arc<Member>>> {
        // A short section that only clones an `Arc`; never held across an `.await`.
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, members: Vec<Arc<Member>>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(members);
    }
}

/// A model served by a pool of OpenAI-compatible servers.
pub struct UpstreamPool {
    info: ModelInfo,
    /// The model name sent upstream.
    upstream_model: String,
    api_key: Option<String>,
    client: reqwest::Client,
    members: Arc<MemberSet>,
    next: AtomicUsize,
    prober: tokio::task::JoinHandle<()>,
    /// The model's tokenizer, to count what streamed by.
    counter: Option<Arc<dyn TokenCounter>>,
    /// Whether `/v1/responses` goes to the upstream's own.
    responses: ResponsesMode,
    /// Whether members get each request's customer and weight.
    forward_customer: bool,
    /// Whether upstreams get each request's `service_tier` in its body.
    forward_service_tier: bool,
    /// Whether upstreams get a request's `prediction` (else it is refused for this model).
    forward_prediction: bool,
    routing: Routing,
}

/// The customer a gateway forwards to a `tollgate worker` with each request (trusted only
/// from the holder of the worker's token).
pub const CUSTOMER_HEADER: &str = "x-tollgate-customer";
/// That customer's scheduling weight.
pub const WEIGHT_HEADER: &str = "x-tollgate-scheduling-weight";
/// The service tier the gateway admitted the request at (`priority`, `default`, `flex`,
/// `batch`): the worker's engine schedules it in that class.
pub const TIER_HEADER: &str = "x-tollgate-service-tier";

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        self.prober.abort();
    }
}

/// A customer's score for a member (highest wins): SHA-256 of both, so it is the same in every
/// gateway replica and release.
fn affinity(customer: &str, member: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(customer.as_bytes())
        .chain_update([0])
        .chain_update(member.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// `http://host:port/v1/` → `http://host:port`.
fn base_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    url.strip_suffix("/v1").unwrap_or(url).to_string()
}

impl UpstreamPool {
    /// Starts probing `urls` (and with [`Discovery::Dns`] resolving them) in the background;
    /// must run inside a tokio runtime.
    pub fn new(
        info: ModelInfo,
        upstream_model: String,
        urls: &[String],
        api_key: Option<String>,
        discovery: Discovery,
    ) -> Result<Self, BackendError> {
        if urls.is_empty() {
            return Err(BackendError::Internal(format!(
                "model `{}`: an http backend needs at least one URL",
                info.id
            )));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| BackendError::Internal(e.to_string()))?;
        let members = Arc::new(MemberSet::default());
        let urls: Vec<String> = urls.iter().map(|u| base_url(u)).collect();
        let parsed = match discovery {
            Discovery::Static => {
                // Optimistic until the first probe says otherwise.
                members.replace(
                    urls.iter()
                        .enumerate()
                        .map(|(i, u)| Member::new(u.clone(), i, true))
                        .collect(),
                );
                Vec::new()
            }
            Discovery::Dns => urls
                .iter()
                .map(|u| {
                    let url = reqwest::Url::parse(u).map_err(|e| {
                        BackendError::Internal(format!("model `{}`: URL `{u}`: {e}", info.id))
                    })?;
                    if url.host_str().is_none() || url.port_or_known_default().is_none() {
                        return Err(BackendError::Internal(format!(
                            "model `{}`: URL `{u}` has no host and port to resolve",
                            info.id
                        )));
                    }
                    Ok(url)
                })
                .collect::<Result<_, _>>()?,
        };
        let prober = tokio::spawn(health::probe(
            client.clone(),
            members.clone(),
            parsed,
            api_key.clone(),
            upstream_model.clone(),
        ));
        Ok(Self {
            info,
            upstream_model,
            api_key,
            client,
            members,
            next: AtomicUsize::new(0),
            prober,
            counter: None,
            responses: ResponsesMode::Translate,
            forward_customer: false,
            forward_service_tier: true,
            forward_prediction: false,
            routing: Routing::LeastBusy,
        })
    }

    /// How `/v1/responses` reaches this pool.
    pub fn with_responses(mut self, mode: ResponsesMode) -> Self {
        self.responses = mode;
        self
    }

    /// Sends each request's customer and scheduling weight to the members (for pools of
    /// `tollgate worker`s, whose engines then share the model between the customers).
    pub fn with_forwarded_customer(mut self, forward: bool) -> Self {
        self.forward_customer = forward;
        self
    }

    /// Whether upstreams get `service_tier` in the body (workers that get the customer get it
    /// as a header whatever this says).
    pub fn with_forwarded_service_tier(mut self, forward: bool) -> Self {
        self.forward_service_tier = forward;
        self
    }

    /// Whether upstreams get OpenAI's `prediction` (workers and servers that accept it); a
    /// request with one is refused (400) otherwise.
    pub fn with_forwarded_prediction(mut self, forward: bool) -> Self {
        self.forward_prediction = forward;
        self
    }

    /// How members are picked.
    pub fn with_routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Counts what streams by with the model's tokenizer (instead of one token per chunk)
    /// when the upstream's own figure is missing or lower.
    pub fn with_token_counter(mut self, counter: Arc<dyn TokenCounter>) -> Self {
        self.counter = Some(counter);
        self
    }

    /// Members to try, best first: healthy ones by requests in flight (ties rotate), then
    /// the ejected ones as a last resort. With [`Routing::Customer`], the healthy members
    /// under the load bound come first, in the customer's own order. With the key of a LoRA
    /// adapter, the healthy members under the load bound that hold it come before all others
    /// (in that order among themselves).
    fn candidates(&self, customer: Option<&str>, adapter: Option<&str>) -> Vec<Arc<Member>> {
        let members = self.members.current();
        let n = members.len();
        if n == 0 {
            return Vec::new();
        }
        let offset = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<Arc<Member>> =
            (0..n).map(|i| members[(i + offset) % n].clone()).collect();
        let load = |m: &Member| m.in_flight.load(Ordering::Relaxed);
        let healthy = |m: &Member| m.healthy.load(Ordering::Relaxed);
        match (self.routing, customer) {
            (Routing::Customer, Some(customer)) => {
                let bound = load_bound(&order);
                order.sort_by_cached_key(|m| {
                    let under = healthy(m) && f64::from(load(m)) < bound;
                    let rank = if under {
                        affinity(customer, &m.base)
                    } else {
                        0
                    };
                    (!healthy(m), !under, std::cmp::Reverse(rank), load(m))
                });
            }
            _ => order.sort_by_key(|m| (!healthy(m), load(m))),
        }
        if let Some(key) = adapter {
            adapters::prefer_holders(&mut order, key);
        }
        order
    }
}

/// Headers a request forwards to every member it tries.
type Headers = Vec<(&'static str, String)>;

impl UpstreamPool {
    /// The headers a request forwards to a worker (its customer, weight and tier, its LoRA
    /// adapter), and its adapter's key.
    fn forwarded(
        &self,
        request: &GenerateRequest,
    ) -> Result<(Headers, Option<String>), BackendError> {
        let mut forwarded = match (&request.customer, self.forward_customer) {
            (Some(customer), true) => vec![
                (CUSTOMER_HEADER, customer.clone()),
                (
                    WEIGHT_HEADER,
                    request.scheduling_weight.unwrap_or(1).to_string(),
                ),
                (TIER_HEADER, request.service_tier.as_str().to_string()),
            ],
            _ => Vec::new(),
        };
        let adapter = match &request.adapter {
            // Config refuses adapters on other upstreams; this is the last guard.
            Some(_) if !self.forward_customer => {
                return Err(BackendError::Internal(format!(
                    "model `{}`: its upstream is not a pool of `tollgate worker`s, which alone \
                     apply LoRA adapters",
                    self.info.id
                )))
            }
            Some(a) => {
                forwarded.extend(adapters::headers(a));
                Some(adapter_key(a))
            }
            None => None,
        };
        Ok((forwarded, adapter))
    }
}

/// The requests in flight a healthy member of `members` may carry before a request it is
/// preferred for goes elsewhere: `LOAD_BOUND` times the healthy members' average (this request
/// included, so an idle pool always has room), and at least `LOAD_FLOOR`.
fn load_bound(members: &[Arc<Member>]) -> f64 {
    let up: Vec<&Arc<Member>> = members
        .iter()
        .filter(|m| m.healthy.load(Ordering::Relaxed))
        .collect();
    let total: u64 = up
        .iter()
        .map(|m| u64::from(m.in_flight.load(Ordering::Relaxed)))
        .sum();
    // Counts of requests in flight and of members are far below 2^53: exact as f64.
    ((total + 1) as f64 * LOAD_BOUND / up.len().max(1) as f64)
        .ceil()
        .max(f64::from(LOAD_FLOOR))
}

#[async_trait::async_trait]
impl Backend for UpstreamPool {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn members(&self) -> Vec<(String, bool)> {
        self.members
            .current()
            .iter()
            .map(|m| (m.base.clone(), m.healthy.load(Ordering::Relaxed)))
            .collect()
    }

    /// A pool of workers: the worker a request goes to reads its adapter's files.
    fn reads_adapters_when_run(&self) -> bool {
        self.forward_customer
    }

    fn passes_responses_through(&self) -> bool {
        self.responses == ResponsesMode::Passthrough
    }

    fn start_responses(
        &self,
        mut body: Value,
        prompt_estimate: u32,
    ) -> Result<PassthroughStream, BackendError> {
        body["model"] = json!(self.upstream_model);
        body["stream"] = json!(true);
        if !self.forward_service_tier {
            if let Some(b) = body.as_object_mut() {
                b.remove("service_tier");
            }
        }
        Ok(responses::run(
            self.client.clone(),
            self.candidates(None, None),
            failover::Credentials {
                api_key: self.api_key.clone(),
                forwarded: Vec::new(),
                adapter: None,
            },
            body,
            prompt_estimate,
            self.counter.clone(),
        ))
    }

    async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, BackendError> {
        if request.prediction.is_some() && !self.forward_prediction {
            return Err(BackendError::InvalidRequest {
                message: format!(
                    "model `{}` does not accept `prediction` (its upstream is not configured \
                     with forward_prediction) - 'prediction'",
                    self.info.id
                ),
                param: Some("prediction".into()),
            });
        }
        let estimate = chat::prompt_bound(&request.prompt);
        let context = self.info.context_length;
        let max_tokens = request
            .params
            .max_tokens
            .unwrap_or_else(|| context.saturating_sub(estimate.min(context)));
        // Workers get the tier as a header beside the customer (their engines schedule by
        // it); other upstreams in the body, as OpenAI's `service_tier`.
        let send_tier = self.forward_service_tier && !self.forward_customer;
        let (path, body) = chat::request_body(&self.upstream_model, &request, send_tier);
        let (forwarded, adapter) = self.forwarded(&request)?;
        let client = self.client.clone();
        let candidates = self.candidates(request.customer.as_deref(), adapter.as_deref());
        let api_key = self.api_key.clone();
        // The request's span: the streams run after its handler has returned.
        let parent = tracing::Span::current();
        let counter = self.counter.clone();
        let start: Start = Box::new(move || {
            Ok(chat::run(
                client,
                candidates,
                failover::Credentials {
                    api_key,
                    forwarded,
                    adapter,
                },
                path,
                body,
                estimate,
                parent,
                counter,
            ))
        });
        Ok(Prepared {
            prompt_tokens: estimate,
            max_tokens,
            start,
            progress: None,
            cached: None,
        })
    }
}

#[cfg(test)]
mod tests;
