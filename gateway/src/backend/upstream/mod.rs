//! Backends over HTTP: a pool of Tollgate workers or of any OpenAI-compatible server (vLLM,
//! TGI, llama.cpp's server), spoken to with the OpenAI streaming API.
//!
//! Routing: each request goes to the healthy member with the fewest requests in flight. A
//! background task probes every member's `/health`; a member that fails a request before its
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

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};

mod responses;

use crate::backend::{
    Backend, BackendError, ChatMessage, EventStream, FinishReason, GenerateEvent, GenerateRequest,
    LogprobEntry, ModelInfo, PassthroughStream, Prepared, Prompt, ResponseFormat, Start,
    TokenCounter, TokenLogprob, ToolChoice, Usage, UsageSource,
};
use crate::config::ResponsesMode;

/// How often members are probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting and receiving the response head; generation itself has no deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a pool finds its members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Discovery {
    /// The configured URLs, one member each.
    #[default]
    Static,
    /// Every address each URL's host name resolves to, resolved again every probe round.
    Dns,
}

/// One upstream server.
#[derive(Debug)]
struct Member {
    /// Base URL without a trailing `/v1`.
    base: String,
    /// The configured URL it came from (an index into the pool's URLs).
    origin: usize,
    in_flight: AtomicU32,
    healthy: AtomicBool,
}

impl Member {
    fn new(base: String, origin: usize, healthy: bool) -> Arc<Self> {
        Arc::new(Self {
            base,
            origin,
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(healthy),
        })
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
}

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        self.prober.abort();
    }
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
        let prober = tokio::spawn(probe(
            client.clone(),
            members.clone(),
            parsed,
            api_key.clone(),
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
        })
    }

    /// How `/v1/responses` reaches this pool.
    pub fn with_responses(mut self, mode: ResponsesMode) -> Self {
        self.responses = mode;
        self
    }

    /// Counts what streams by with the model's tokenizer (instead of one token per chunk)
    /// when the upstream's own figure is missing or lower.
    pub fn with_token_counter(mut self, counter: Arc<dyn TokenCounter>) -> Self {
        self.counter = Some(counter);
        self
    }

    /// Members to try, best first: healthy ones by requests in flight (ties rotate), then
    /// the ejected ones as a last resort.
    fn candidates(&self) -> Vec<Arc<Member>> {
        let members = self.members.current();
        let n = members.len();
        if n == 0 {
            return Vec::new();
        }
        let offset = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<Arc<Member>> =
            (0..n).map(|i| members[(i + offset) % n].clone()).collect();
        order.sort_by_key(|m| {
            (
                !m.healthy.load(Ordering::Relaxed),
                m.in_flight.load(Ordering::Relaxed),
            )
        });
        order
    }
}

/// The addresses a host name resolves to.
async fn lookup(host: String, port: u16) -> std::io::Result<Vec<IpAddr>> {
    Ok(tokio::net::lookup_host((host.as_str(), port))
        .await?
        .map(|a| a.ip())
        .collect())
}

/// Resolves every URL with `resolve` and replaces the members with one per address, keeping
/// the members (their health and requests in flight) of addresses seen before. A URL that
/// fails to resolve keeps its members until it resolves again; one that resolves to nothing
/// (no Ready pod behind a headless Service) has none. `failing` (one flag per URL) keeps the
/// log to one line when a URL starts failing and one when it resolves again.
async fn discover<F, Fut>(
    members: &MemberSet,
    urls: &[reqwest::Url],
    failing: &mut [bool],
    resolve: F,
) where
    F: Fn(String, u16) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<IpAddr>>>,
{
    let old = members.current();
    let by_base: HashMap<&str, &Arc<Member>> = old.iter().map(|m| (m.base.as_str(), m)).collect();
    let mut next: Vec<Arc<Member>> = Vec::new();
    for (origin, url) in urls.iter().enumerate() {
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            continue;
        };
        let failed = failing.get_mut(origin);
        let ips = match resolve(host.trim_matches(['[', ']']).to_string(), port).await {
            Ok(ips) => {
                if let Some(f) = failed.filter(|f| **f) {
                    *f = false;
                    tracing::info!(url = %url, "the upstream's host resolves again");
                }
                ips
            }
            Err(e) => {
                if let Some(f) = failed.filter(|f| !**f) {
                    *f = true;
                    tracing::warn!(url = %url, "cannot resolve the upstream's host, keeping its members: {e}");
                }
                next.extend(old.iter().filter(|m| m.origin == origin).cloned());
                continue;
            }
        };
        for ip in ips {
            let mut member_url = url.clone();
            if member_url.set_ip_host(ip).is_err() {
                continue;
            }
            let base = base_url(member_url.as_str());
            if next.iter().any(|m| m.base == base) {
                continue;
            }
            match by_base.get(base.as_str()) {
                Some(m) => next.push(Arc::clone(m)),
                None => {
                    tracing::info!(upstream = %base, from = %url, "upstream discovered");
                    // Probed right after discovery before it is preferred.
                    next.push(Member::new(base, origin, false));
                }
            }
        }
    }
    for m in old
        .iter()
        .filter(|m| !next.iter().any(|n| n.base == m.base))
    {
        tracing::info!(upstream = %m.base, "upstream no longer resolves: removed");
    }
    let changed =
        next.len() != old.len() || next.iter().zip(old.iter()).any(|(a, b)| !Arc::ptr_eq(a, b));
    if changed {
        members.replace(next);
    }
}

/// Probes every member's `/health` forever, ejecting and readmitting them; with DNS
/// discovery (`urls` not empty), resolves the members again before each round.
async fn probe(
    client: reqwest::Client,
    members: Arc<MemberSet>,
    urls: Vec<reqwest::Url>,
    api_key: Option<String>,
) {
    let mut failing = vec![false; urls.len()];
    loop {
        if !urls.is_empty() {
            discover(&members, &urls, &mut failing, lookup).await;
        }
        for m in members.current().iter() {
            let mut req = client
                .get(format!("{}/health", m.base))
                .timeout(PROBE_TIMEOUT);
            if let Some(k) = &api_key {
                req = req.bearer_auth(k);
            }
            let ok = matches!(req.send().await, Ok(r) if r.status().is_success());
            let was = m.healthy.swap(ok, Ordering::Relaxed);
            if was != ok {
                if ok {
                    tracing::info!(upstream = %m.base, "upstream healthy again: readmitted");
                } else {
                    tracing::warn!(upstream = %m.base, "upstream failed its health check: ejected");
                }
            }
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Releases a member's in-flight slot when the stream ends or is dropped.
struct InFlight(Arc<Member>);

impl InFlight {
    fn new(m: Arc<Member>) -> Self {
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(m)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upper bound of the prompt's tokens without the upstream's tokenizer: every token of a
/// byte-level BPE covers at least one byte, plus a few template tokens per message.
fn prompt_bound(prompt: &Prompt) -> u32 {
    let n = match prompt {
        Prompt::Chat(messages) => {
            messages
                .iter()
                .map(|m| m.content.len() + m.role.len() + 8)
                .sum::<usize>()
                + 8
        }
        Prompt::Text(text) => text.len() + 2,
    };
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One message in OpenAI's shape.
fn message_json(m: &ChatMessage) -> Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        v["tool_calls"] = json!(m
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect::<Vec<_>>());
        if m.content.is_empty() {
            v["content"] = Value::Null;
        }
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    v
}

/// Logprob entries of one chunk, from the chat (`logprobs.content`) or the legacy
/// (`logprobs.tokens` / `token_logprobs` / `top_logprobs`) shape.
fn chunk_logprobs(choice: &Value) -> Vec<LogprobEntry> {
    let lp = &choice["logprobs"];
    let token = |v: &Value| TokenLogprob {
        token: v["token"].as_str().unwrap_or_default().to_string(),
        logprob: v["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
        bytes: v["bytes"]
            .as_array()
            .map(|b| {
                b.iter()
                    .filter_map(|x| x.as_u64().and_then(|x| u8::try_from(x).ok()))
                    .collect()
            })
            .unwrap_or_else(|| v["token"].as_str().unwrap_or_default().as_bytes().to_vec()),
    };
    if let Some(content) = lp["content"].as_array() {
        return content
            .iter()
            .map(|e| LogprobEntry {
                chosen: token(e),
                top: e["top_logprobs"]
                    .as_array()
                    .map(|t| t.iter().map(token).collect())
                    .unwrap_or_default(),
            })
            .collect();
    }
    let (Some(tokens), Some(values)) = (lp["tokens"].as_array(), lp["token_logprobs"].as_array())
    else {
        return Vec::new();
    };
    tokens
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (t, v))| {
            let text = t.as_str().unwrap_or_default();
            LogprobEntry {
                chosen: TokenLogprob {
                    token: text.to_string(),
                    logprob: v.as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
                    bytes: text.as_bytes().to_vec(),
                },
                top: lp["top_logprobs"][i]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| TokenLogprob {
                                token: k.clone(),
                                logprob: v.as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
                                bytes: k.as_bytes().to_vec(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// The OpenAI request body for one sequence.
fn request_body(model: &str, request: &GenerateRequest) -> (String, Value) {
    let p = &request.params;
    let mut body = json!({
        "model": model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": p.temperature,
        "top_p": p.top_p,
    });
    let path = match &request.prompt {
        Prompt::Chat(messages) => {
            body["messages"] = json!(messages.iter().map(message_json).collect::<Vec<_>>());
            if let Some(t) = &request.tools {
                body["tools"] = json!(t
                    .tools
                    .iter()
                    .map(|d| {
                        let mut f = json!({"name": d.name, "parameters": d.parameters});
                        if let Some(desc) = &d.description {
                            f["description"] = json!(desc);
                        }
                        if let Some(strict) = d.strict {
                            f["strict"] = json!(strict);
                        }
                        json!({"type": "function", "function": f})
                    })
                    .collect::<Vec<_>>());
                body["tool_choice"] = match &t.choice {
                    ToolChoice::None => json!("none"),
                    ToolChoice::Auto => json!("auto"),
                    ToolChoice::Required => json!("required"),
                    ToolChoice::Function(name) => {
                        json!({"type": "function", "function": {"name": name}})
                    }
                };
                body["parallel_tool_calls"] = json!(t.parallel);
            }
            if let Some(k) = p.logprobs {
                body["logprobs"] = json!(true);
                body["top_logprobs"] = json!(k);
            }
            "/v1/chat/completions"
        }
        Prompt::Text(text) => {
            body["prompt"] = json!(text);
            if let Some(k) = p.logprobs {
                body["logprobs"] = json!(k);
            }
            "/v1/completions"
        }
    };
    match &request.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => body["response_format"] = json!({"type": "json_object"}),
        ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        } => {
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": strict},
            })
        }
    }
    if let Some(m) = p.max_tokens {
        body["max_tokens"] = json!(m);
    }
    if let Some(s) = p.seed {
        body["seed"] = json!(s);
    }
    if !p.stop.is_empty() {
        body["stop"] = json!(p.stop);
    }
    if p.frequency_penalty != 0.0 {
        body["frequency_penalty"] = json!(p.frequency_penalty);
    }
    if p.presence_penalty != 0.0 {
        body["presence_penalty"] = json!(p.presence_penalty);
    }
    if p.top_k > 0 {
        body["top_k"] = json!(p.top_k);
    }
    if p.repetition_penalty != 1.0 {
        body["repetition_penalty"] = json!(p.repetition_penalty);
    }
    (path.to_string(), body)
}

/// What one upstream attempt ended with before its first event.
enum Attempt {
    Stream(reqwest::Response),
    /// Try another member.
    Retry(String),
    /// Final: the request itself was refused (4xx other than 429).
    Refused(BackendError),
}

async fn attempt(
    client: &reqwest::Client,
    member: &Member,
    api_key: Option<&str>,
    path: &str,
    body: &Value,
    call: &tracing::Span,
) -> Attempt {
    let mut req = client
        .post(format!("{}{path}", member.base))
        .json(body)
        .headers(crate::server::telemetry::propagation_headers(call));
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    let response = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            member.healthy.store(false, Ordering::Relaxed);
            return Attempt::Retry(format!("{}: {e}", member.base));
        }
    };
    let status = response.status();
    call.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_success() {
        return Attempt::Stream(response);
    }
    let text = response.text().await.unwrap_or_default();
    let error = serde_json::from_str::<Value>(&text).ok();
    let param = error
        .as_ref()
        .and_then(|v| v["error"]["param"].as_str().map(str::to_string));
    let message = error
        .as_ref()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(text);
    if status.is_server_error() || status.as_u16() == 429 {
        if status.is_server_error() && status.as_u16() != 503 {
            member.healthy.store(false, Ordering::Relaxed);
        }
        return Attempt::Retry(format!("{}: {status}: {message}", member.base));
    }
    // The upstream's own `param` locates the field in the same request body.
    Attempt::Refused(BackendError::InvalidRequest {
        message: format!("the upstream refused the request ({status}): {message}"),
        param,
    })
}

fn finish_reason(text: &str) -> FinishReason {
    match text {
        "length" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    }
}

/// A finished sequence's usage from the upstream's `usage` object (if it sent one), never
/// below what the gateway observed: an output figure that is missing, not a number, or
/// smaller than the output tokens seen streaming by (`observed`: counted with the model's
/// tokenizer, or one per chunk) is replaced by that count,
/// and the usage says so ([`UsageSource::Observed`]). A missing prompt figure is the
/// gateway's upper bound of the prompt.
fn settled_usage(usage: Option<&Value>, prompt_estimate: u32, observed: u32) -> Usage {
    let number = |v: &Value| v.as_u64().map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let Some(u) = usage else {
        return Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: observed,
            cached_tokens: 0,
            source: UsageSource::Observed,
        };
    };
    let prompt_tokens = number(&u["prompt_tokens"]).unwrap_or(prompt_estimate);
    let reported = number(&u["completion_tokens"]);
    let (completion_tokens, source) = match reported {
        Some(n) if n >= observed => (n, UsageSource::Upstream),
        _ => (observed, UsageSource::Observed),
    };
    let cached_tokens = number(&u["prompt_tokens_details"]["cached_tokens"])
        .unwrap_or(0)
        .min(prompt_tokens);
    Usage {
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        source,
    }
}

/// Tokens one chunk of output adds: counted with the tokenizer, at least one.
fn tokens_of(counter: Option<&dyn TokenCounter>, text: &str) -> u32 {
    match counter {
        Some(c) if !text.is_empty() => c.count(text).max(1),
        _ => 1,
    }
}

/// Streams one sequence from the best member, retrying on others until the first event.
#[allow(clippy::too_many_arguments)]
fn run(
    client: reqwest::Client,
    candidates: Vec<Arc<Member>>,
    api_key: Option<String>,
    path: String,
    body: Value,
    prompt_estimate: u32,
    parent: tracing::Span,
    counter: Option<Arc<dyn TokenCounter>>,
) -> EventStream {
    let count = move |text: &str| tokens_of(counter.as_deref(), text);
    let stream = async_stream::stream! {
        let mut errors = Vec::new();
        let mut overloaded = 0;
        for member in candidates {
            let slot = InFlight::new(member.clone());
            // One client span per attempt, open while its stream is read; its context goes
            // upstream as `traceparent`.
            let call = crate::server::telemetry::span(|| {
                tracing::info_span!(
                    parent: &parent,
                    "upstream.call",
                    otel.name = "upstream call",
                    otel.kind = "client",
                    server.address = %member.base,
                    http.response.status_code = tracing::field::Empty,
                )
            });
            let response = match attempt(&client, &member, api_key.as_deref(), &path, &body, &call).await {
                Attempt::Stream(r) => r,
                Attempt::Retry(e) => {
                    tracing::warn!("upstream attempt failed, trying another: {e}");
                    if e.contains("429") || e.contains("503") {
                        overloaded += 1;
                    }
                    errors.push(e);
                    continue;
                }
                Attempt::Refused(e) => {
                    yield Err(e);
                    return;
                }
            };
            let mut events = response.bytes_stream().eventsource();
            let mut started = false;
            // Output tokens seen streaming by (see `tokens_of`).
            let mut observed = 0u32;
            let mut finish = None;
            let mut usage: Option<Value> = None;
            let mut failure = None;
            while let Some(event) = events.next().await {
                let data = match event {
                    Ok(e) => e.data,
                    Err(e) => {
                        failure = Some(format!("{}: stream broken: {e}", member.base));
                        break;
                    }
                };
                if data.trim() == "[DONE]" {
                    break;
                }
                let Ok(chunk) = serde_json::from_str::<Value>(&data) else {
                    failure = Some(format!("{}: unreadable event `{data}`", member.base));
                    break;
                };
                if let Some(message) = chunk["error"]["message"].as_str() {
                    failure = Some(format!("{}: {message}", member.base));
                    break;
                }
                // Started once the upstream produced something (a role-only first chunk does
                // not count: until text arrives the request can still move elsewhere).
                let choice = chunk["choices"].get(0);
                let text = choice
                    .and_then(|c| c["delta"]["content"].as_str().or_else(|| c["text"].as_str()))
                    .unwrap_or("");
                let finished_here = choice.is_some_and(|c| c["finish_reason"].is_string());
                let calls = choice
                    .and_then(|c| c["delta"]["tool_calls"].as_array())
                    .cloned()
                    .unwrap_or_default();
                if !started && (!text.is_empty() || finished_here || !calls.is_empty()) {
                    started = true;
                    yield Ok(GenerateEvent::Started { prompt_tokens: prompt_estimate });
                }
                if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
                    usage = Some(u.clone());
                }
                let Some(choice) = choice else { continue };
                let logprobs = chunk_logprobs(choice);
                if !text.is_empty() || !logprobs.is_empty() || !calls.is_empty() {
                    let arguments: String = calls
                        .iter()
                        .filter_map(|c| c["function"]["arguments"].as_str())
                        .collect();
                    observed = observed.saturating_add(count(&format!("{text}{arguments}")));
                    yield Ok(GenerateEvent::Delta {
                        text: text.to_string(),
                        logprobs,
                        completion_tokens: observed,
                    });
                }
                for call in &calls {
                    yield Ok(GenerateEvent::ToolCallDelta {
                        index: call["index"].as_u64().and_then(|i| u32::try_from(i).ok()).unwrap_or(0),
                        id: call["id"].as_str().map(str::to_string),
                        name: call["function"]["name"].as_str().map(str::to_string),
                        arguments: call["function"]["arguments"].as_str().unwrap_or_default().to_string(),
                    });
                }
                if let Some(f) = choice["finish_reason"].as_str() {
                    finish = Some(finish_reason(f));
                }
            }
            if failure.is_none() && finish.is_none() {
                failure = Some(format!("{}: the stream ended without a finish reason", member.base));
            }
            match failure {
                Some(e) if !started => {
                    // Nothing reached the client: another member may still serve it.
                    member.healthy.store(false, Ordering::Relaxed);
                    tracing::warn!("upstream failed before its first token, trying another: {e}");
                    errors.push(e);
                    drop(slot);
                    continue;
                }
                Some(e) => {
                    member.healthy.store(false, Ordering::Relaxed);
                    yield Err(BackendError::Broken(e));
                    return;
                }
                None => {}
            }
            let usage = settled_usage(usage.as_ref(), prompt_estimate, observed);
            yield Ok(GenerateEvent::Finished { reason: finish.unwrap_or(FinishReason::Stop), usage });
            drop(slot);
            return;
        }
        if overloaded > 0 && overloaded == errors.len() {
            yield Err(BackendError::Overloaded { retry_after_secs: 1 });
        } else {
            yield Err(BackendError::Unavailable(format!("every upstream failed: {}", errors.join("; "))));
        }
    };
    Box::pin(stream)
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
        Ok(responses::run(
            self.client.clone(),
            self.candidates(),
            self.api_key.clone(),
            body,
            prompt_estimate,
            self.counter.clone(),
        ))
    }

    async fn prepare(&self, request: GenerateRequest) -> Result<Prepared, BackendError> {
        let estimate = prompt_bound(&request.prompt);
        let context = self.info.context_length;
        let max_tokens = request
            .params
            .max_tokens
            .unwrap_or_else(|| context.saturating_sub(estimate.min(context)));
        let (path, body) = request_body(&self.upstream_model, &request);
        let client = self.client.clone();
        let candidates = self.candidates();
        let api_key = self.api_key.clone();
        // The request's span: the streams run after its handler has returned.
        let parent = tracing::Span::current();
        let counter = self.counter.clone();
        let start: Start = Box::new(move || {
            Ok(run(
                client, candidates, api_key, path, body, estimate, parent, counter,
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_lose_their_v1() {
        assert_eq!(base_url("http://w1:8081/v1/"), "http://w1:8081");
        assert_eq!(base_url("http://w1:8081"), "http://w1:8081");
    }

    #[tokio::test]
    async fn dns_discovery_tracks_the_addresses_and_keeps_known_members() {
        let set = MemberSet::default();
        let urls = [reqwest::Url::parse("http://workers.ns:8081").unwrap()];
        let mut failing = [false];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let bases = |set: &MemberSet| -> Vec<String> {
            set.current().iter().map(|m| m.base.clone()).collect()
        };
        discover(&set, &urls, &mut failing, |host, port| async move {
            assert_eq!((host.as_str(), port), ("workers.ns", 8081));
            Ok(vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.1")])
        })
        .await;
        assert_eq!(
            bases(&set),
            ["http://10.0.0.1:8081", "http://10.0.0.2:8081"]
        );
        assert!(set
            .current()
            .iter()
            .all(|m| !m.healthy.load(Ordering::Relaxed)));
        let kept = set.current()[1].clone();
        kept.in_flight.store(3, Ordering::Relaxed);

        // A pod went away, another came: the one still there is the same member.
        discover(&set, &urls, &mut failing, |_, _| async {
            Ok(vec![ip("10.0.0.2"), ip("fd00::3")])
        })
        .await;
        assert_eq!(
            bases(&set),
            ["http://10.0.0.2:8081", "http://[fd00::3]:8081"]
        );
        assert!(Arc::ptr_eq(&set.current()[0], &kept));

        // A failed lookup keeps what was there; an empty answer leaves no member.
        discover(&set, &urls, &mut failing, |_, _| async {
            Err(std::io::Error::other("no DNS"))
        })
        .await;
        assert_eq!(set.current().len(), 2);
        assert_eq!(failing, [true]);
        discover(&set, &urls, &mut failing, |_, _| async { Ok(Vec::new()) }).await;
        assert!(set.current().is_empty());
        assert_eq!(failing, [false]);
    }

    #[test]
    fn upstream_usage_never_bills_fewer_output_tokens_than_were_seen() {
        // 7 content chunks streamed by; the prompt was estimated at 40 tokens.
        let seen = 7;
        let settle = |u: Option<Value>| settled_usage(u.as_ref(), 40, seen);
        // No `usage` at all: the observed count and the prompt estimate.
        let u = settle(None);
        assert_eq!(
            (
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_tokens,
                u.source
            ),
            (40, 7, 0, UsageSource::Observed)
        );
        // `completion_tokens: null` and `0`: replaced by what was seen.
        for bad in [json!(null), json!(0), json!("12"), json!(3)] {
            let u = settle(Some(json!({"prompt_tokens": 12, "completion_tokens": bad})));
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.source),
                (12, 7, UsageSource::Observed),
                "completion_tokens {bad}"
            );
        }
        // A figure at least the observed one is the upstream's (chunks may hold several
        // tokens), with its cached prompt tokens.
        let u = settle(Some(json!({
            "prompt_tokens": 12, "completion_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 8},
        })));
        assert_eq!(
            (
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_tokens,
                u.source
            ),
            (12, 9, 8, UsageSource::Upstream)
        );
        // Cached tokens are never more than the prompt.
        let u = settle(Some(json!({
            "prompt_tokens": 5, "completion_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 50},
        })));
        assert_eq!(u.cached_tokens, 5);
    }

    #[test]
    fn prompt_bound_is_at_least_the_bytes() {
        let p = Prompt::Text("héllo".into());
        assert!(prompt_bound(&p) >= 6);
    }
}
