//! Prometheus metrics: names carry the `tollgate_` prefix and their unit; labels
//! are bounded (configured model ids, route templates, status codes), never raw ids or paths.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

use crate::backend::{Backend, ResidencyState};

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
];
/// The metering path is meant to cost tens of microseconds.
const METERING_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];

/// The gateway's own share of a request: tens of microseconds when caches are warm,
/// milliseconds when a key or a budget is looked up in the database.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// A model's cold load takes seconds (a 1B Q8_0 GGUF: about one) to minutes.
const LOAD_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 180.0];

/// Local models loaded on demand within the memory budget: which are loaded, their memory,
/// their loads, unloads and load times (label `model`).
#[derive(Clone)]
struct Residencies {
    loaded: GaugeVec,
    memory: GaugeVec,
    load_seconds: HistogramVec,
    loads: IntCounterVec,
    unloads: IntCounterVec,
}

/// A gauge labelled by model, registered in `registry`.
fn model_gauge(registry: &Registry, name: &str, help: &str) -> Result<GaugeVec, prometheus::Error> {
    let g = GaugeVec::new(Opts::new(name, help), &["model"])?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// A counter labelled by model, registered in `registry`.
fn model_counter(
    registry: &Registry,
    name: &str,
    help: &str,
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), &["model"])?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Residencies {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| model_gauge(registry, name, help);
        let counter = |name: &str, help: &str| model_counter(registry, name, help);
        let load_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_model_load_seconds",
                "Time to load a local model (read its weights, start its engine).",
            )
            .buckets(LOAD_BUCKETS.to_vec()),
            &["model"],
        )?;
        registry.register(Box::new(load_seconds.clone()))?;
        Ok(Self {
            loaded: gauge(
                "tollgate_model_loaded",
                "1 when a local model is loaded (or draining), 0 when unloaded or loading.",
            )?,
            memory: gauge(
                "tollgate_model_memory_bytes",
                "What a loaded local model counts against model_memory_bytes: its weights file plus its KV cache reservation.",
            )?,
            load_seconds,
            loads: counter("tollgate_model_loads_total", "Loads of a local model.")?,
            unloads: counter("tollgate_model_unloads_total", "Unloads of a local model.")?,
        })
    }

    /// Catches up with each model's residency; models no longer in the catalogue vanish.
    fn render(&self, backends: &HashMap<String, Arc<dyn Backend>>) {
        self.loaded.reset();
        self.memory.reset();
        for (model, backend) in backends {
            let Some(r) = backend.residency() else {
                continue;
            };
            let loaded = matches!(r.state, ResidencyState::Loaded | ResidencyState::Draining);
            self.loaded
                .with_label_values(&[model])
                .set(if loaded { 1.0 } else { 0.0 });
            self.memory.with_label_values(&[model]).set(if loaded {
                bytes_gauge(r.memory_bytes)
            } else {
                0.0
            });
            // The loads since the last scrape, timed from the residency's recent list (a
            // scrape after more than `RECENT_LOADS` loads times only the latest).
            let loads = self.loads.with_label_values(&[model]);
            let new = r.loads_total.saturating_sub(loads.get());
            let recent = &r.recent_load_seconds;
            let timed = usize::try_from(new).unwrap_or(usize::MAX).min(recent.len());
            let h = self.load_seconds.with_label_values(&[model]);
            for s in &recent[recent.len() - timed..] {
                h.observe(*s);
            }
            loads.inc_by(new);
            let unloads = self.unloads.with_label_values(&[model]);
            unloads.inc_by(r.unloads_total.saturating_sub(unloads.get()));
        }
    }
}

/// Latencies per class of service (labels `model` and `service_tier`, four tiers at most).
#[derive(Clone)]
pub struct TierLatencies {
    /// From the request to the engine's admission of its (first) sequence; for an upstream,
    /// which says nothing of its queue, to its first output.
    pub queue_wait: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
}

/// The gateway's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: CounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub time_per_output_token: HistogramVec,
    /// By model and `service_tier` (the tier served): the time to admission, to the first
    /// token, and between tokens.
    pub tiers: TierLatencies,
    pub input_tokens: CounterVec,
    pub output_tokens: CounterVec,
    queue_depth: GaugeVec,
    running: GaugeVec,
    kv_used: GaugeVec,
    kv_capacity: GaugeVec,
    batch_size: GaugeVec,
    engine_steps: IntCounterVec,
    interleaved_steps: IntCounterVec,
    prefill_tokens: IntCounterVec,
    decode_tokens: IntCounterVec,
    prefix_cache: GaugeVec,
    prefix_hits: IntCounterVec,
    backend_healthy: GaugeVec,
    /// Lines of Batch API batches queued and running, every replica's (read from the ledger
    /// database by the batch runner), by model and state.
    pub batch_lines: GaugeVec,
    /// Lines of batches this replica ran to an end, by model and state (`completed`,
    /// `failed`).
    pub batch_lines_finished: IntCounterVec,
    pub ledger_pending: IntGauge,
    pub ledger_spooled: IntGauge,
    /// Connections closed at once because the listener was at its connection limit.
    pub connections_refused: IntCounter,
    /// API requests answered 503 at once because `max_inflight_requests` were in flight.
    pub requests_shed: IntCounter,
    /// Time the metering path (limits, reservation, durable ledger write) adds to a request.
    pub metering_duration: HistogramVec,
    /// Everything the gateway adds to a request outside its backend.
    pub gateway_overhead: HistogramVec,
    residencies: Residencies,
}

impl Metrics {
    // `allow`, not `expect`: the lint is off by default, denied only by scripts/test.sh's run.
    #[allow(
        clippy::too_many_lines,
        reason = "a declarative table: one registration per metric, read one at a time"
    )]
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<CounterVec, prometheus::Error> {
                let c = CounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram = |name: &str,
                         help: &str,
                         labels: &[&str],
                         buckets: &[f64]|
         -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let int_counter = |name: &str, help: &str| model_counter(&registry, name, help);
        let gauge = |name: &str, help: &str| model_gauge(&registry, name, help);
        Ok(Self {
            requests: counter(
                "tollgate_requests_total",
                "HTTP requests by route, model and status.",
                &["route", "model", "status"],
            )?,
            request_duration: histogram(
                "tollgate_request_duration_seconds",
                "Time to the response headers (non-streamed: the whole answer).",
                &["route", "model"],
                LATENCY_BUCKETS,
            )?,
            time_to_first_token: histogram(
                "tollgate_time_to_first_token_seconds",
                "From the request to the first generated token.",
                &["model"],
                LATENCY_BUCKETS,
            )?,
            time_per_output_token: histogram(
                "tollgate_time_per_output_token_seconds",
                "Mean time between output tokens of one sequence after the first.",
                &["model"],
                TOKEN_LATENCY_BUCKETS,
            )?,
            tiers: TierLatencies {
                queue_wait: histogram(
                    "tollgate_queue_wait_seconds",
                    "From the request to its admission by a local engine (an upstream: to its first output), by the service tier served.",
                    &["model", "service_tier"],
                    LATENCY_BUCKETS,
                )?,
                time_to_first_token: histogram(
                    "tollgate_service_tier_time_to_first_token_seconds",
                    "From the request to the first generated token, by the service tier served.",
                    &["model", "service_tier"],
                    LATENCY_BUCKETS,
                )?,
                inter_token_latency: histogram(
                    "tollgate_service_tier_inter_token_latency_seconds",
                    "Mean time between output tokens of one request after the first, by the service tier served.",
                    &["model", "service_tier"],
                    TOKEN_LATENCY_BUCKETS,
                )?,
            },
            input_tokens: counter(
                "tollgate_input_tokens_total",
                "Prompt tokens processed.",
                &["model"],
            )?,
            output_tokens: counter(
                "tollgate_output_tokens_total",
                "Tokens generated.",
                &["model"],
            )?,
            queue_depth: gauge("tollgate_queue_depth", "Requests waiting for the engine.")?,
            running: gauge("tollgate_running_sequences", "Sequences being generated.")?,
            kv_used: gauge("tollgate_kv_cache_used_bytes", "KV-cache memory in use.")?,
            kv_capacity: gauge(
                "tollgate_kv_cache_capacity_bytes",
                "KV-cache memory budget.",
            )?,
            batch_size: gauge(
                "tollgate_batch_size",
                "Sequences in the engine's last forward pass (decode and prefill together).",
            )?,
            engine_steps: int_counter(
                "tollgate_engine_steps_total",
                "Forward passes of the engine (batch size on average: decode tokens / steps).",
            )?,
            interleaved_steps: int_counter(
                "tollgate_engine_interleaved_steps_total",
                "Forward passes that started a newcomer (a customer with nothing running) between \
                 the layers of another pass, so its first token did not wait for that pass.",
            )?,
            prefill_tokens: int_counter(
                "tollgate_prefill_tokens_total",
                "Prompt tokens run through the model (prefill).",
            )?,
            decode_tokens: int_counter(
                "tollgate_decode_tokens_total",
                "Tokens decoded by the engine, one per running sequence per step.",
            )?,
            prefix_cache: gauge(
                "tollgate_prefix_cache_bytes",
                "KV memory the prefix cache holds for finished prompts.",
            )?,
            prefix_hits: int_counter(
                "tollgate_prefix_cache_hit_tokens_total",
                "Prompt tokens taken from the prefix cache instead of being prefilled.",
            )?,
            backend_healthy: {
                let g = GaugeVec::new(
                    Opts::new(
                        "tollgate_backend_healthy",
                        "1 when an upstream server of a model is in rotation, 0 when ejected.",
                    ),
                    &["model", "backend"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            batch_lines: {
                let g = GaugeVec::new(
                    Opts::new(
                        "tollgate_batch_lines",
                        "Lines of Batch API batches queued or running now, over every replica.",
                    ),
                    &["model", "state"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            batch_lines_finished: {
                let c = IntCounterVec::new(
                    Opts::new(
                        "tollgate_batch_lines_finished_total",
                        "Lines of Batch API batches this replica ran to an end, by state.",
                    ),
                    &["model", "state"],
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            ledger_pending: {
                let g = IntGauge::new(
                    "tollgate_ledger_pending_records",
                    "Usage records accepted but not yet in the database.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            ledger_spooled: {
                let g = IntGauge::new(
                    "tollgate_ledger_spooled_records",
                    "Usage records in the local spool file.",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            connections_refused: {
                let c = IntCounter::new(
                    "tollgate_connections_refused_total",
                    "Connections closed at once because the listener had max_connections open.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            requests_shed: {
                let c = IntCounter::new(
                    "tollgate_requests_shed_total",
                    "API requests answered 503 at once because max_inflight_requests were in flight.",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            metering_duration: histogram(
                "tollgate_metering_duration_seconds",
                "Time the metering path adds to a request, by phase (auth: key lookup; admit: limits and reservations; record: durable ledger write).",
                &["phase"],
                METERING_BUCKETS,
            )?,
            gateway_overhead: histogram(
                "tollgate_gateway_overhead_seconds",
                "Time the gateway adds to a served request outside the backend: from arrival to the backend's start (parsing, validation, auth, limits, reservations; not the backend's tokenization), plus the durable ledger write before the end of the response.",
                &["model"],
                OVERHEAD_BUCKETS,
            )?,
            residencies: Residencies::new(&registry)?,
            registry,
        })
    }

    /// Prometheus text, with load gauges read from the backends now.
    pub fn render(&self, backends: &HashMap<String, Arc<dyn Backend>>) -> String {
        // Members come and go with DNS discovery: only the current ones are shown.
        self.backend_healthy.reset();
        for (model, backend) in backends {
            let load = backend.load();
            self.queue_depth
                .with_label_values(&[model])
                .set(f64::from(load.waiting));
            self.running
                .with_label_values(&[model])
                .set(f64::from(load.running));
            self.kv_used
                .with_label_values(&[model])
                .set(bytes_gauge(load.kv_cache_used_bytes));
            self.kv_capacity
                .with_label_values(&[model])
                .set(bytes_gauge(load.kv_cache_capacity_bytes));
            self.batch_size
                .with_label_values(&[model])
                .set(f64::from(load.batch_size));
            self.prefix_cache
                .with_label_values(&[model])
                .set(bytes_gauge(load.prefix_cache_bytes));
            for (counter, total) in [
                (&self.engine_steps, load.steps_total),
                (&self.interleaved_steps, load.interleaved_steps_total),
                (&self.prefill_tokens, load.prefill_tokens_total),
                (&self.decode_tokens, load.decode_tokens_total),
                (&self.prefix_hits, load.prefix_hit_tokens_total),
            ] {
                // The engine keeps the totals; the counters catch up at each scrape.
                let c = counter.with_label_values(&[model]);
                c.inc_by(total.saturating_sub(c.get()));
            }
            for (member, healthy) in backend.members() {
                self.backend_healthy
                    .with_label_values(&[model, &member])
                    .set(if healthy { 1.0 } else { 0.0 });
            }
        }
        self.residencies.render(backends);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A byte count as a gauge's `f64`: exact below 2^53 bytes (8 PiB), beyond any KV cache.
fn bytes_gauge(bytes: u64) -> f64 {
    bytes as f64
}
