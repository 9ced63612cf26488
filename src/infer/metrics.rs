//! The prediction side's Prometheus metrics: the engine's gauges and histograms, and the
//! per-tag counters an operator (or a gateway routing by tag) reads to see which tags
//! carry the load.

use std::sync::Arc;
use std::time::Instant;

use super::PredictError;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
};

/// Engine gauges and histograms, registered in the server's Prometheus registry.
pub struct EngineMetrics {
    pub queue_depth: IntGauge,
    pub batch_size: Histogram,
    pub restarts: IntCounter,
    /// Generations decoding, and the bytes their slot cache holds.
    pub decoding: IntGauge,
    pub decode_cache_bytes: IntGauge,
    /// Generation prompt positions taken from the prefix cache instead of computed, and
    /// the bytes that cache holds.
    pub prefix_reused_tokens: IntCounter,
    pub prefix_cache_bytes: IntGauge,
    /// 429s of admission by `stage`: `before_preparation` (on the request's estimate) or
    /// `after_preparation` (it outgrew its estimate). Under overload nearly all should be
    /// the first: a refusal after preparation cost the compute of tokenising.
    pub refusals: IntCounterVec,
}

impl EngineMetrics {
    pub fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let queue_depth = IntGauge::new(
            "tagllm_queue_depth",
            "Requests waiting for the inference thread",
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("tagllm_batch_size", "Sequences per engine batch")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
        )?;
        let restarts = IntCounter::new(
            "tagllm_engine_restarts_total",
            "Times the inference engine failed and was restarted",
        )?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        let decoding = IntGauge::new("tagllm_generations_decoding", "Generations decoding")?;
        let decode_cache_bytes = IntGauge::new(
            "tagllm_decode_cache_bytes",
            "Bytes of keys/values held for the generations decoding",
        )?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(decoding.clone()))?;
        registry.register(Box::new(decode_cache_bytes.clone()))?;
        let prefix_reused_tokens = IntCounter::new(
            "tagllm_prefix_reused_tokens_total",
            "Generation prompt positions whose keys and values came from the prefix cache",
        )?;
        let prefix_cache_bytes = IntGauge::new(
            "tagllm_prefix_cache_bytes",
            "Bytes of prompts' keys and values kept for reuse by later prompts",
        )?;
        registry.register(Box::new(prefix_reused_tokens.clone()))?;
        registry.register(Box::new(prefix_cache_bytes.clone()))?;
        let refusals = IntCounterVec::new(
            Opts::new(
                "tagllm_admission_refusals_total",
                "Requests refused by admission (429), before or after their preparation",
            ),
            &["stage"],
        )?;
        registry.register(Box::new(refusals.clone()))?;
        Ok(Self {
            queue_depth,
            batch_size,
            restarts,
            decoding,
            decode_cache_bytes,
            prefix_reused_tokens,
            prefix_cache_bytes,
            refusals,
        })
    }
}
/// Requests, tokens and latency by function tag. The `tag` label is a served function
/// tag's name, or [`NO_TAG`] for requests that name none (a free template, the base
/// model), or [`UNKNOWN_TAG`]: a name the client made up never becomes a label, so the
/// series are bounded by the served tags.
pub struct TagMetrics {
    /// `outcome`: `ok`, `invalid` (4xx), `refused` (429), `failed` (5xx, expired).
    pub requests: IntCounterVec,
    /// `kind`: `prompt` or `completion` (generated tokens).
    pub tokens: IntCounterVec,
    /// Seconds from arrival to the answer (for a stream: to its last event), answered
    /// requests only.
    pub latency: HistogramVec,
}

/// The `tag` label of a request that names no function tag.
pub const NO_TAG: &str = "(none)";
/// The `tag` label of a request that names a tag the server does not serve.
pub const UNKNOWN_TAG: &str = "(unknown)";

impl TagMetrics {
    pub fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "tagllm_tag_requests_total",
                "Prediction requests by function tag and outcome",
            ),
            &["tag", "outcome"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "tagllm_tag_tokens_total",
                "Prompt and generated tokens by function tag",
            ),
            &["tag", "kind"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "tagllm_tag_request_duration_seconds",
                "Answered prediction requests' latency by function tag",
            )
            .buckets(vec![
                0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
            &["tag"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Self {
            requests,
            tokens,
            latency,
        })
    }
}

/// A request's place in the per-tag metrics: its labels (one per function, in order) and
/// when it arrived. Each request is counted once, answered or failed.
#[derive(Clone)]
pub(super) struct Observed {
    pub(super) metrics: Arc<TagMetrics>,
    pub(super) labels: Vec<String>,
    pub(super) started: Instant,
}

impl Observed {
    pub(super) fn answered(&self, prompt_tokens: &[usize], completion_tokens: &[usize]) {
        let secs = self.started.elapsed().as_secs_f64();
        for (i, label) in self.labels.iter().enumerate() {
            let m = &self.metrics;
            m.requests.with_label_values(&[label, "ok"]).inc();
            m.latency.with_label_values(&[label]).observe(secs);
            let count = |kind: &str, n: Option<&usize>| {
                m.tokens
                    .with_label_values(&[label, kind])
                    .inc_by(n.copied().unwrap_or(0) as u64)
            };
            count("prompt", prompt_tokens.get(i));
            count("completion", completion_tokens.get(i));
        }
    }

    pub(super) fn failed(&self, e: &PredictError) {
        let outcome = match e {
            PredictError::Validation(_) => "invalid",
            PredictError::Overloaded(_) => "refused",
            PredictError::Backend(_) | PredictError::Expired(_) => "failed",
        };
        for label in &self.labels {
            self.metrics
                .requests
                .with_label_values(&[label, outcome])
                .inc();
        }
    }

    /// Counts `result`'s failure, if it is one, and passes it on.
    pub(super) fn check<T>(&self, result: Result<T, PredictError>) -> Result<T, PredictError> {
        if let Err(e) = &result {
            self.failed(e);
        }
        result
    }
}
