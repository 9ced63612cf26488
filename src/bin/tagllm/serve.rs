//! `tagllm serve` and `tagllm worker`: flags mapped onto the library's service and worker.

use std::path::PathBuf;
use tagllm::http::ConnectionLimits;
use tagllm::infer::{EngineConfig, Limits};
use tagllm::jobs::WorkerConfig;

use anyhow::Result;
use tagllm::model::device;

use crate::{init_logging, ModelArgs};

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[arg(long, env = "TAGLLM_HOST", default_value = "127.0.0.1")]
    pub(crate) host: String,
    #[arg(long, env = "TAGLLM_PORT", default_value_t = 8080)]
    pub(crate) port: u16,
    /// Tag bundles (one directory per tag), watched for changes.
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = crate::TAGS_DIR)]
    pub(crate) tags_dir: PathBuf,
    /// Where the service keeps its own data (job store, uploaded datasets).
    #[arg(long, env = "TAGLLM_DATA_DIR", default_value = "data")]
    pub(crate) data_dir: PathBuf,
    /// Padded tokens per engine batch.
    #[arg(long, env = "TAGLLM_MAX_BATCH_TOKENS", default_value_t = EngineConfig::default().max_batch_tokens)]
    pub(crate) max_batch_tokens: usize,
    /// Longest composed input (tokens + tag vectors).
    #[arg(long, env = "TAGLLM_MAX_INPUT_TOKENS", default_value_t = Limits::default().max_input_tokens)]
    pub(crate) max_input_tokens: usize,
    /// Inputs per /predict request.
    #[arg(long, env = "TAGLLM_MAX_BATCH_INPUTS", default_value_t = Limits::default().max_batch_inputs)]
    pub(crate) max_batch_inputs: usize,
    #[arg(long, env = "TAGLLM_MAX_NEW_TOKENS", default_value_t = Limits::default().max_new_tokens)]
    pub(crate) max_new_tokens: usize,
    /// Prompt + new tokens one request's generations may hold at once (its memory bound).
    #[arg(long, env = "TAGLLM_MAX_GENERATION_TOKENS", default_value_t = Limits::default().max_generation_tokens)]
    pub(crate) max_generation_tokens: usize,
    /// Requests in flight at once; more get 429.
    #[arg(long, env = "TAGLLM_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub(crate) max_concurrent_requests: usize,
    /// Admission: a head request (regression, classification) whose estimated wait before
    /// it is answered, behind the head work admitted before it and one slice of the
    /// engine's iteration, exceeds this gets 429 at once; not started in twice this, 503.
    #[arg(long, env = "TAGLLM_MAX_QUEUE_MS", default_value_t = EngineConfig::default().max_queue_wait.as_millis() as u64)]
    pub(crate) max_queue_ms: u64,
    /// Admission: a generation whose estimated wait for its first token (a decoding slot,
    /// the prompts ahead of it) exceeds this gets 429 at once.
    #[arg(long, env = "TAGLLM_MAX_FIRST_TOKEN_MS", default_value_t = EngineConfig::default().max_first_token_wait.as_millis() as u64)]
    pub(crate) max_first_token_ms: u64,
    /// Generations decoded together at most (the decoding batch's slots).
    #[arg(long, env = "TAGLLM_MAX_GENERATIONS", default_value_t = EngineConfig::default().max_generations)]
    pub(crate) max_generations: usize,
    /// Memory the decoding batch's keys and values may take, in MiB: bounds how many long
    /// generations decode together.
    #[arg(long, env = "TAGLLM_KV_CACHE_MIB", default_value_t = EngineConfig::default().kv_cache_bytes >> 20)]
    pub(crate) kv_cache_mib: usize,
    /// Memory kept, in MiB, for prefilled prompts' keys and values, so that generation
    /// prompts beginning with the same tokens (a system turn, a tag's template) skip them
    /// (0: off).
    #[arg(long, env = "TAGLLM_PREFIX_CACHE_MIB", default_value_t = EngineConfig::default().prefix_cache_bytes >> 20)]
    pub(crate) prefix_cache_mib: usize,
    /// How serving reads the frozen matrices for decoding steps: auto (q8_0 on CPU, f32 on
    /// a GPU), f32, or q8_0 (re-quantized at load: 3-5x faster decoding on CPU, a small
    /// drift). Prompts, and so every head, are computed in f32 either way; training
    /// always uses f32.
    #[arg(long, env = "TAGLLM_PRECISION", default_value_t = EngineConfig::default().precision)]
    pub(crate) precision: tagllm::model::Precision,
    /// Request body size limit in bytes; larger bodies get 413.
    #[arg(long, env = "TAGLLM_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub(crate) max_body_bytes: usize,
    /// Seconds a client has to send a request's header; an idle kept-alive connection is
    /// closed after this too.
    #[arg(long, env = "TAGLLM_HEADER_READ_TIMEOUT_SECS", default_value_t = ConnectionLimits::default().header_read_timeout.as_secs_f64())]
    pub(crate) header_read_timeout_secs: f64,
    /// Seconds a request body may send nothing before it fails with 408.
    #[arg(long, env = "TAGLLM_BODY_READ_TIMEOUT_SECS", default_value_t = ConnectionLimits::default().body_read_timeout.as_secs_f64())]
    pub(crate) body_read_timeout_secs: f64,
    /// Open connections at most; more wait in the listen backlog.
    #[arg(long, env = "TAGLLM_MAX_CONNECTIONS", default_value_t = ConnectionLimits::default().max_connections)]
    pub(crate) max_connections: usize,
    /// Seconds shutdown waits for requests in flight before it closes their connections.
    #[arg(long, env = "TAGLLM_SHUTDOWN_GRACE_SECS", default_value_t = ConnectionLimits::default().shutdown_grace.as_secs_f64())]
    pub(crate) shutdown_grace_secs: f64,
    /// Bearer token required on every route but /health and /ready (empty: none, as when unset,
    /// so that `TAGLLM_API_KEY=` in an env file means no key).
    #[arg(long, env = "TAGLLM_API_KEY", value_parser = non_empty_key)]
    pub(crate) api_key: Option<NonEmptyKey>,
    /// Bearer token required for routes that change state (tag reload, ...).
    #[arg(long, env = "TAGLLM_ADMIN_API_KEY", value_parser = non_empty_key)]
    pub(crate) admin_api_key: Option<NonEmptyKey>,
    /// Do not watch the tags directory (POST /tags/reload still rescans).
    #[arg(long, env = "TAGLLM_NO_WATCH")]
    pub(crate) no_watch: bool,
    /// Job store: sqlite://PATH or postgres://... (default: SQLite in --data-dir).
    #[arg(long, env = "TAGLLM_DATABASE_URL")]
    pub(crate) database_url: Option<String>,
    /// Training files named by {"path": ...} must lie under this directory.
    #[arg(long, env = "TAGLLM_DATA_ROOT")]
    pub(crate) data_root: Option<PathBuf>,
    /// Largest dataset accepted by POST /datasets or read from the data root, in bytes.
    #[arg(long, env = "TAGLLM_MAX_DATASET_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub(crate) max_dataset_bytes: usize,
    /// Do not run an embedded training worker (run `tagllm worker` elsewhere).
    #[arg(long, env = "TAGLLM_NO_WORKER")]
    pub(crate) no_worker: bool,
    #[command(flatten)]
    pub(crate) worker: WorkerArgs,
}

#[derive(clap::Args, Clone)]
pub(crate) struct WorkerArgs {
    /// A job whose worker stops heartbeating for this long is taken over by another.
    #[arg(long, env = "TAGLLM_LEASE_SECONDS", default_value_t = WorkerConfig::default().lease.as_secs())]
    pub(crate) lease_seconds: u64,
    /// Checkpoint a running job into the store every this many steps.
    #[arg(long, env = "TAGLLM_CHECKPOINT_EVERY", default_value_t = WorkerConfig::default().checkpoint_every)]
    pub(crate) checkpoint_every: usize,
}

impl WorkerArgs {
    fn config(&self) -> WorkerConfig {
        let lease = std::time::Duration::from_secs(self.lease_seconds.max(1));
        WorkerConfig {
            lease,
            heartbeat: (lease / 4).min(std::time::Duration::from_secs(2)),
            checkpoint_every: self.checkpoint_every,
            ..Default::default()
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct WorkerCmd {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The job store shared with the API servers.
    #[arg(long, env = "TAGLLM_DATABASE_URL")]
    pub(crate) database_url: String,
    /// Where finished tags are published (shared with the API servers).
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = crate::TAGS_DIR)]
    pub(crate) tags_dir: PathBuf,
    #[command(flatten)]
    pub(crate) worker: WorkerArgs,
}

/// An API key flag whose empty value means "no key".
#[derive(Clone)]
pub(crate) struct NonEmptyKey(Option<String>);

pub(crate) fn non_empty_key(s: &str) -> Result<NonEmptyKey, String> {
    Ok(NonEmptyKey((!s.is_empty()).then(|| s.to_string())))
}

pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    init_logging();
    let loopback = args.host == "127.0.0.1" || args.host == "localhost" || args.host == "::1";
    if !loopback && args.api_key.as_ref().and_then(|k| k.0.as_ref()).is_none() {
        tracing::warn!(host = %args.host, "listening beyond loopback without --api-key: anyone who can reach it can use it");
    }
    let device = device::parse_device(&args.model.device)?;
    std::fs::create_dir_all(&args.data_dir)?;
    let config = tagllm::service::ServiceConfig {
        server: tagllm::http::ServerConfig {
            api_key: args.api_key.clone().and_then(|k| k.0),
            admin_api_key: args.admin_api_key.clone().and_then(|k| k.0),
            max_concurrent_requests: args.max_concurrent_requests,
            max_body_bytes: args.max_body_bytes,
            max_dataset_bytes: args.max_dataset_bytes,
            data_root: args.data_root.clone(),
            connections: ConnectionLimits {
                header_read_timeout: seconds(
                    args.header_read_timeout_secs,
                    "--header-read-timeout-secs",
                )?,
                body_read_timeout: seconds(
                    args.body_read_timeout_secs,
                    "--body-read-timeout-secs",
                )?,
                max_connections: args.max_connections.max(1),
                shutdown_grace: seconds(args.shutdown_grace_secs, "--shutdown-grace-secs")?,
            },
        },
        model_path: args.model.path()?,
        device,
        tags_dir: args.tags_dir.clone(),
        watch: !args.no_watch,
        limits: Limits {
            max_input_tokens: args.max_input_tokens,
            max_batch_inputs: args.max_batch_inputs,
            max_new_tokens: args.max_new_tokens,
            max_generation_tokens: args.max_generation_tokens,
        },
        engine: tagllm::infer::EngineConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_queue_wait: std::time::Duration::from_millis(args.max_queue_ms),
            max_first_token_wait: std::time::Duration::from_millis(args.max_first_token_ms),
            max_generations: args.max_generations,
            kv_cache_bytes: args.kv_cache_mib << 20,
            prefix_cache_bytes: args.prefix_cache_mib << 20,
            precision: args.precision,
            ..Default::default()
        },
        database_url: args
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("tagllm.db").display())),
        worker: (!args.no_worker).then(|| args.worker.config()),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tagllm::http::listen(&args.host, args.port).await?;
        tracing::info!(addr = %listener.local_addr()?, "listening; loading the model");
        tagllm::service::Service::start(config)
            .await?
            .serve(listener)
            .await
    })
}

pub(crate) fn worker(cmd: WorkerCmd) -> Result<()> {
    init_logging();
    let device = device::parse_device(&cmd.model.device)?;
    tracing::info!(device = %device::describe(&device), "loading the model");
    let base = tagllm::service::Base::load(&cmd.model.path()?, &device, &cmd.tags_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let store = rt.block_on(tagllm::jobs::JobStore::connect(&cmd.database_url))?;
    // SIGTERM hands the running job back to the queue at its next step.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    rt.spawn(async move {
        tagllm::shutdown::signal().await;
        tracing::info!("stopping: the running job goes back to the queue");
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let worker = base.spawn_worker(store, cmd.worker.config(), rt.handle().clone(), stop)?;
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the training worker panicked"))
}

/// A duration flag given in seconds: positive and finite.
fn seconds(secs: f64, flag: &str) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("{flag} must be a positive number of seconds, not {secs}"))
}
