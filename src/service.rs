//! The service, assembled in one place: HTTP state, the job store, the model loaded off the
//! async threads (so `/health` answers while it loads), the embedded training worker, and
//! a shutdown that stops them in order. `tagllm serve`, the integration tests and the serve
//! benchmark all start the service here.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::http::{new_state, AppState, ServerConfig};
use crate::infer::{EngineConfig, Limits, Predictor};
use crate::jobs::{JobStore, Worker, WorkerConfig};
use crate::model::BaseModel;
use crate::tags::{BaseModelIdentity, Registry};

/// What everything in one process shares: the base model, loaded once, and the registry
/// of the tags over it. The predictor serves from it and training workers train on it.
pub struct Base {
    pub model: Arc<BaseModel>,
    pub registry: Arc<Registry>,
}

impl Base {
    pub fn load(model_path: &Path, device: &Device, tags_dir: &Path) -> Result<Self> {
        let model = Arc::new(BaseModel::load(model_path, device)?);
        let registry = Registry::open(tags_dir, BaseModelIdentity::of(&model), device.clone())?;
        Ok(Self { model, registry })
    }

    /// A training worker on this base, claiming jobs from `store`, on a thread of its own
    /// at lowered priority (predictions stay responsive); it hands its running job back to
    /// the queue and returns once `stop` is set.
    pub fn spawn_worker(
        &self,
        store: JobStore,
        config: WorkerConfig,
        runtime: tokio::runtime::Handle,
        stop: Arc<AtomicBool>,
    ) -> Result<std::thread::JoinHandle<()>> {
        let worker = Worker {
            store,
            model: self.model.clone(),
            registry: self.registry.clone(),
            config,
            runtime,
        };
        Ok(std::thread::Builder::new()
            .name("training-worker".into())
            .spawn(move || {
                crate::model::threads::lower_this_thread_priority();
                worker.run(stop)
            })?)
    }
}

pub struct ServiceConfig {
    pub server: ServerConfig,
    pub model_path: PathBuf,
    pub device: Device,
    pub tags_dir: PathBuf,
    /// Watch `tags_dir` and hot-load what changes.
    pub watch: bool,
    pub limits: Limits,
    pub engine: EngineConfig,
    /// `sqlite://PATH` or `postgres://...`.
    pub database_url: String,
    /// Run a training worker in this process, with this configuration.
    pub worker: Option<WorkerConfig>,
}

pub struct Service {
    pub state: Arc<AppState>,
    /// The model load in progress; its error ends `serve`.
    loading: Option<tokio::task::JoinHandle<Result<()>>>,
    /// Set on shutdown: the embedded worker hands its job back to the queue and exits.
    stop_worker: Arc<AtomicBool>,
    worker: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Service {
    /// Connects the job store and starts loading the model on the blocking pool; until it
    /// is loaded every route but `/health` answers 503 "not ready".
    pub async fn start(cfg: ServiceConfig) -> Result<Self> {
        // Before the first tensor op: the compute pool must yield to the HTTP threads.
        crate::model::threads::lower_compute_pool_priority();
        let state = new_state(cfg.server)?;
        let store = JobStore::connect(&cfg.database_url)
            .await
            .with_context(|| format!("opening the job store {}", cfg.database_url))?;
        let _ = state.jobs.set(store);
        let stop_worker = Arc::new(AtomicBool::new(false));
        let worker = Arc::new(std::sync::Mutex::new(None));
        let loading = {
            let (state, stop, slot) = (state.clone(), stop_worker.clone(), worker.clone());
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || -> Result<()> {
                let base = Base::load(&cfg.model_path, &cfg.device, &cfg.tags_dir)?;
                let p = Predictor::new(
                    base.model.clone(),
                    base.registry.clone(),
                    cfg.watch,
                    cfg.limits,
                    cfg.engine,
                    &state.metrics.registry,
                )?;
                tracing::info!(model = %p.model.name, tags = p.registry.snapshot().tags.len(), "ready");
                if let (Some(config), Some(store)) = (cfg.worker, state.jobs.get()) {
                    let handle = base.spawn_worker(store.clone(), config, runtime, stop)?;
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
                }
                let _ = state.predictor.set(Arc::new(p));
                Ok(())
            })
        };
        Ok(Self {
            state,
            loading: Some(loading),
            stop_worker,
            worker,
        })
    }

    /// Waits until the model is loaded; the load's error if it failed.
    pub async fn loaded(&mut self) -> Result<()> {
        match self.loading.take() {
            Some(h) => h.await.context("the model loader panicked")?,
            None => Ok(()),
        }
    }

    /// Serves on `listener` until `stop` completes (or the model fails to load), then
    /// finishes requests in flight and stops the worker, which hands its running job back
    /// to the queue.
    pub async fn serve_until(
        mut self,
        listener: tokio::net::TcpListener,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let loading = self.loading.take();
        let failed_load = async move {
            match loading {
                Some(h) => match h.await {
                    Ok(Ok(())) => std::future::pending().await,
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::anyhow!("the model loader panicked: {e}"),
                },
                None => std::future::pending().await,
            }
        };
        let served = tokio::select! {
            r = crate::http::serve_until(listener, self.state.clone(), stop) => r,
            e = failed_load => Err(e.context("loading the model")),
        };
        self.shutdown().await;
        served
    }

    /// Serves until SIGTERM or ctrl-c.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> Result<()> {
        self.serve_until(listener, crate::shutdown::signal()).await
    }

    /// Stops the embedded worker and waits for it (its job is back in the queue).
    pub async fn shutdown(&self) {
        self.stop_worker.store(true, Ordering::Relaxed);
        let handle = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // A service dropped without `serve` (tests) still stops its worker.
        self.stop_worker.store(true, Ordering::Relaxed);
    }
}
