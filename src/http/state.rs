//! What every handler shares.

use std::sync::{Arc, OnceLock};

use prometheus::{HistogramVec, IntCounterVec, IntGauge};
use tokio::sync::Semaphore;

use crate::infer::Predictor;

#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    pub api_key: Option<String>,
    pub admin_api_key: Option<String>,
    pub max_concurrent_requests: usize,
    pub max_body_bytes: usize,
    /// `POST /datasets` bodies may be this large.
    pub max_dataset_bytes: usize,
    /// Training data named by `{"path": ...}` must lie under this directory.
    pub data_root: Option<std::path::PathBuf>,
    /// Read timeouts, the connection cap and the shutdown grace period.
    pub connections: super::ConnectionLimits,
}

pub struct HttpMetrics {
    pub registry: prometheus::Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub tags_loaded: IntGauge,
}

impl HttpMetrics {
    pub fn new() -> prometheus::Result<Self> {
        // Bounds at the service's targets (a 429 or `/health` within 50 or 100 ms, an
        // admitted request within 2 s), so the histogram tells whether they hold; powers
        // of two put the nearest bounds at 32 and 64 ms.
        const LATENCY_BUCKETS: [f64; 19] = [
            0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
            10.0, 30.0, 60.0, 120.0,
        ];
        let registry = prometheus::Registry::new();
        let requests = IntCounterVec::new(
            prometheus::Opts::new("tagllm_requests_total", "HTTP requests by route and status"),
            &["route", "status"],
        )?;
        let latency = HistogramVec::new(
            prometheus::HistogramOpts::new(
                "tagllm_request_duration_seconds",
                "HTTP request latency by route and status",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "status"],
        )?;
        let tags_loaded = IntGauge::new("tagllm_tags_loaded", "Tags currently served")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(tags_loaded.clone()))?;
        Ok(Self {
            registry,
            requests,
            latency,
            tags_loaded,
        })
    }
}

pub struct AppState {
    pub config: ServerConfig,
    /// Set once the model is loaded; until then the service answers 503 "not ready".
    pub predictor: OnceLock<Arc<Predictor>>,
    /// The job store, where training is enabled.
    pub jobs: OnceLock<crate::jobs::JobStore>,
    pub permits: Arc<Semaphore>,
    pub metrics: HttpMetrics,
    /// Becomes true when the server starts shutting down: long-lived responses (event
    /// streams) end then, so graceful shutdown does not wait for their clients.
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

impl AppState {
    pub fn jobs(&self) -> Result<&crate::jobs::JobStore, super::error::ApiError> {
        self.jobs.get().ok_or_else(|| {
            super::error::ApiError::new(
                super::error::ErrorKind::NotReady,
                "training is not enabled on this server (no job store)",
            )
        })
    }

    pub fn predictor(&self) -> Result<&Arc<Predictor>, super::error::ApiError> {
        self.predictor
            .get()
            .ok_or_else(super::error::ApiError::not_ready)
    }
}
