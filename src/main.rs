//! The `tagllm` command line.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use tagllm::model::{self, device, generate, BaseModel, GenerationParams};

#[derive(Parser)]
#[command(
    name = "tagllm",
    version,
    about = "Serve and train Tag-LLM tags on one frozen LLM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// A llama-architecture GGUF file or an HF model directory.
    #[arg(long, env = "TAGLLM_MODEL", default_value = model::DEFAULT_MODEL_PATH)]
    model: PathBuf,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, env = "TAGLLM_DEVICE", default_value = "cpu")]
    device: String,
}

impl ModelArgs {
    fn load(&self) -> Result<BaseModel> {
        let dev = device::parse_device(&self.device)?;
        BaseModel::load(&self.model, &dev)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum TinyFormat {
    Gguf,
    Hf,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, sizes, parameter count and weight fingerprint of the model.
    Info {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Prints the token ids of TEXT as {"ids": [...]}.
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        text: String,
    },
    /// Generates a continuation of TEXT (the chat template applied unless --raw).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// Use TEXT as it is, without the model's chat template.
        #[arg(long, env = "TAGLLM_RAW")]
        raw: bool,
        #[arg(long, env = "TAGLLM_MAX_NEW_TOKENS", default_value_t = 64)]
        max_new_tokens: usize,
        /// 0 (the default) decodes greedily.
        #[arg(long, env = "TAGLLM_TEMPERATURE", default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, env = "TAGLLM_TOP_P")]
        top_p: Option<f64>,
        #[arg(long, env = "TAGLLM_SEED", default_value_t = 0)]
        seed: u64,
        /// Print {"ids": [...], "text": "..."} instead of the text alone.
        #[arg(long, env = "TAGLLM_JSON")]
        json: bool,
        text: String,
    },
    /// Runs the HTTP service: loads the model once, serves tags from --tags-dir.
    Serve(ServeArgs),
    /// Runs a standalone training worker against a shared job store.
    Worker(WorkerCmd),
    /// Trains tags locally (a progress bar) and writes the bundles to --tags-dir.
    Train(TrainCmd),
    /// Prints the metrics of a function tag on a labelled JSONL file.
    Eval(EvalCmd),
    /// Prints the frozen model's final hidden state at the last position of each composed
    /// record, one JSON array per line (features for a linear probe).
    Embed(EmbedCmd),
    /// Tag bundle utilities.
    Tags {
        #[command(subcommand)]
        command: TagsCommand,
    },
    /// Prints the OpenAPI document of the HTTP service (checked in as openapi/openapi.json).
    Openapi,
    /// Writes the project's tiny seeded model (for tests and experiments).
    TinyModel {
        #[arg(long, env = "TAGLLM_TINY_OUT")]
        out: PathBuf,
        #[arg(long, env = "TAGLLM_TINY_FORMAT", value_enum, default_value = "gguf")]
        format: TinyFormat,
        #[arg(long, env = "TAGLLM_TINY_SEED", default_value_t = 0)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, env = "TAGLLM_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "TAGLLM_PORT", default_value_t = 8080)]
    port: u16,
    /// Tag bundles (one directory per tag), watched for changes.
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = "tags")]
    tags_dir: PathBuf,
    /// Where the service keeps its own data (job store, uploaded datasets).
    #[arg(long, env = "TAGLLM_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Padded tokens per engine batch.
    #[arg(long, env = "TAGLLM_MAX_BATCH_TOKENS", default_value_t = 4096)]
    max_batch_tokens: usize,
    /// Longest composed input (tokens + tag vectors).
    #[arg(long, env = "TAGLLM_MAX_INPUT_TOKENS", default_value_t = 1024)]
    max_input_tokens: usize,
    /// Inputs per /predict request.
    #[arg(long, env = "TAGLLM_MAX_BATCH_INPUTS", default_value_t = 256)]
    max_batch_inputs: usize,
    #[arg(long, env = "TAGLLM_MAX_NEW_TOKENS", default_value_t = 512)]
    max_new_tokens: usize,
    /// Requests in flight at once; more get 429.
    #[arg(long, env = "TAGLLM_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    max_concurrent_requests: usize,
    /// Admission by work: a /predict whose estimated wait behind the queued work (at the
    /// engine's measured pace) exceeds this gets 429 at once; queued twice as long, 503.
    #[arg(long, env = "TAGLLM_MAX_QUEUE_MS", default_value_t = 1000)]
    max_queue_ms: u64,
    /// Request body size limit in bytes; larger bodies get 413.
    #[arg(long, env = "TAGLLM_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Bearer token required on every route but /health and /ready (empty: none, as when unset,
    /// so that `TAGLLM_API_KEY=` in an env file means no key).
    #[arg(long, env = "TAGLLM_API_KEY", value_parser = non_empty_key)]
    api_key: Option<NonEmptyKey>,
    /// Bearer token required for routes that change state (tag reload, ...).
    #[arg(long, env = "TAGLLM_ADMIN_API_KEY", value_parser = non_empty_key)]
    admin_api_key: Option<NonEmptyKey>,
    /// Do not watch the tags directory (POST /tags/reload still rescans).
    #[arg(long, env = "TAGLLM_NO_WATCH")]
    no_watch: bool,
    /// Job store: sqlite://PATH or postgres://... (default: SQLite in --data-dir).
    #[arg(long, env = "TAGLLM_DATABASE_URL")]
    database_url: Option<String>,
    /// Training files named by {"path": ...} must lie under this directory.
    #[arg(long, env = "TAGLLM_DATA_ROOT")]
    data_root: Option<PathBuf>,
    /// Largest dataset accepted by POST /datasets or read from the data root, in bytes.
    #[arg(long, env = "TAGLLM_MAX_DATASET_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_dataset_bytes: usize,
    /// Do not run an embedded training worker (run `tagllm worker` elsewhere).
    #[arg(long, env = "TAGLLM_NO_WORKER")]
    no_worker: bool,
    #[command(flatten)]
    worker: WorkerArgs,
}

#[derive(clap::Args, Clone)]
struct WorkerArgs {
    /// A job whose worker stops heartbeating for this long is taken over by another.
    #[arg(long, env = "TAGLLM_LEASE_SECONDS", default_value_t = 60)]
    lease_seconds: u64,
    /// Checkpoint a running job into the store every this many steps.
    #[arg(long, env = "TAGLLM_CHECKPOINT_EVERY", default_value_t = 25)]
    checkpoint_every: usize,
}

impl WorkerArgs {
    fn config(&self) -> tagllm::jobs::WorkerConfig {
        let lease = std::time::Duration::from_secs(self.lease_seconds.max(1));
        tagllm::jobs::WorkerConfig {
            lease,
            heartbeat: (lease / 4).min(std::time::Duration::from_secs(2)),
            checkpoint_every: self.checkpoint_every,
            ..Default::default()
        }
    }
}

#[derive(clap::Args)]
struct WorkerCmd {
    #[command(flatten)]
    model: ModelArgs,
    /// The job store shared with the API servers.
    #[arg(long, env = "TAGLLM_DATABASE_URL")]
    database_url: String,
    /// Where finished tags are published (shared with the API servers).
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = "tags")]
    tags_dir: PathBuf,
    #[command(flatten)]
    worker: WorkerArgs,
}

#[derive(clap::Args)]
struct TrainCmd {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = "tags")]
    tags_dir: PathBuf,
    /// 1: domain tags; 2: a single-domain function tag; 3: cross-domain / multi-task.
    #[arg(long)]
    stage: u8,
    /// The tag to learn (repeat for several domain tags in stage 1).
    #[arg(long = "tag", required = true)]
    tags: Vec<String>,
    /// Default for stage 1: `<TAG>{text}`.
    #[arg(long)]
    template: Option<String>,
    /// The labelled field (stages 2 and 3).
    #[arg(long)]
    target: Option<String>,
    #[arg(long, value_parser = ["regression", "classification", "none"], default_value = "none")]
    head: String,
    /// JSONL training data.
    #[arg(long)]
    data: PathBuf,
    /// JSONL held-out data.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    // Hyperparameters left out take the defaults `POST /train` uses
    // (`Hyperparameters::default`), so the CLI and the API train alike.
    #[arg(long)]
    steps: Option<usize>,
    /// Passes over the training data; sets the number of steps when given.
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate of the tag vectors.
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Peak learning rate of the head (default: --learning-rate).
    #[arg(long)]
    head_learning_rate: Option<f64>,
    #[arg(long)]
    warmup_ratio: Option<f64>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    num_vectors: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Where tag vectors start: `mean`, `text:PHRASE` or `tag:NAME`.
    #[arg(long)]
    init: Option<String>,
    /// `fit` (closed form on the step-0 features) or `random`.
    #[arg(long, value_parser = ["fit", "random"])]
    head_init: Option<String>,
    /// Evaluate every N steps (0: every epoch).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Stop after this many evaluations without improvement (0: never).
    #[arg(long)]
    patience: Option<usize>,
    /// Memory for the frozen-prefix cache, MiB (default: half the available memory).
    #[arg(long, env = "TAGLLM_PREFIX_CACHE_MB")]
    prefix_cache_mb: Option<usize>,
    /// Appends one JSON line per step (step, loss, learning rate, eval metrics when
    /// evaluated, seconds since start): the loss curve.
    #[arg(long)]
    log: Option<PathBuf>,
}

#[derive(clap::Args)]
struct EvalCmd {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = "tags")]
    tags_dir: PathBuf,
    /// A function tag with a head.
    #[arg(long)]
    function: String,
    /// Labelled JSONL: the template's slots and the target field.
    #[arg(long)]
    data: PathBuf,
    /// The labelled field (default: the target the tag was trained on).
    #[arg(long)]
    target: Option<String>,
}

#[derive(clap::Args)]
struct EmbedCmd {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = "tags")]
    tags_dir: PathBuf,
    /// e.g. `The molecule {smiles} has druglikeness` (tags allowed).
    #[arg(long)]
    template: String,
    /// JSONL with the template's slots.
    #[arg(long)]
    data: PathBuf,
}

#[derive(Subcommand)]
enum TagsCommand {
    /// Copies the bundles in --from into --tags-dir where no tag of that name exists yet,
    /// each atomically (a deployment's one-shot seeding of its shared tags volume).
    Seed {
        #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = "tags")]
        tags_dir: PathBuf,
        /// The shipped bundles, e.g. the image's read-only copy.
        #[arg(long, env = "TAGLLM_SEED_TAGS_FROM")]
        from: PathBuf,
    },
    /// Writes tag NAME from --tags-dir as a PEFT prompt-tuning adapter directory.
    ExportPeft {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = "tags")]
        tags_dir: PathBuf,
        name: String,
        out: PathBuf,
    },
}

fn serve(args: ServeArgs) -> Result<()> {
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
        },
        model_path: args.model.model.clone(),
        device,
        tags_dir: args.tags_dir.clone(),
        watch: !args.no_watch,
        limits: tagllm::infer::Limits {
            max_input_tokens: args.max_input_tokens,
            max_batch_inputs: args.max_batch_inputs,
            max_new_tokens: args.max_new_tokens,
        },
        engine: tagllm::infer::EngineConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_queue_wait: std::time::Duration::from_millis(args.max_queue_ms),
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
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
        tracing::info!(addr = %listener.local_addr()?, "listening; loading the model");
        tagllm::service::Service::start(config)
            .await?
            .serve(listener)
            .await
    })
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .try_init();
}

fn worker(cmd: WorkerCmd) -> Result<()> {
    init_logging();
    let device = device::parse_device(&cmd.model.device)?;
    tracing::info!(device = %device::describe(&device), "loading the model");
    let model = std::sync::Arc::new(BaseModel::load(&cmd.model.model, &device)?);
    let identity = tagllm::tags::BaseModelIdentity::of(&model);
    let registry = tagllm::tags::Registry::open(&cmd.tags_dir, identity, device.clone())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let store = rt.block_on(tagllm::jobs::JobStore::connect(&cmd.database_url))?;
    let w = tagllm::jobs::Worker {
        store,
        model,
        registry,
        config: cmd.worker.config(),
        runtime: rt.handle().clone(),
    };
    // SIGTERM hands the running job back to the queue at its next step.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    rt.spawn(async move {
        tagllm::shutdown::signal().await;
        tracing::info!("stopping: the running job goes back to the queue");
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    w.run(stop);
    Ok(())
}

impl TrainCmd {
    fn hyperparameters(&self) -> tagllm::train::Hyperparameters {
        let d = tagllm::train::Hyperparameters::default();
        tagllm::train::Hyperparameters {
            steps: self.steps.unwrap_or(d.steps),
            epochs: self.epochs.unwrap_or(d.epochs),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            learning_rate: self.learning_rate.unwrap_or(d.learning_rate),
            head_learning_rate: self.head_learning_rate.or(d.head_learning_rate),
            warmup_ratio: self.warmup_ratio.unwrap_or(d.warmup_ratio),
            grad_accum: self.grad_accum.unwrap_or(d.grad_accum),
            num_vectors: self.num_vectors.unwrap_or(d.num_vectors),
            seed: self.seed.unwrap_or(d.seed),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            init: self.init.clone().unwrap_or(d.init),
            head_init: match self.head_init.as_deref() {
                Some("random") => tagllm::train::HeadInit::Random,
                Some(_) => tagllm::train::HeadInit::Fit,
                None => d.head_init,
            },
            eval_every: self.eval_every.unwrap_or(d.eval_every),
            patience: self.patience.unwrap_or(d.patience),
        }
    }
}

fn train(cmd: TrainCmd) -> Result<()> {
    use tagllm::train::{Dataset, HeadKind, TrainJob, Trainer};
    let (m, tags) = model_and_tags(&cmd.model, &cmd.tags_dir)?;
    let read = |p: &PathBuf| -> Result<Dataset> {
        let text = std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
        Dataset::from_jsonl(&text).map_err(|e| anyhow::anyhow!("{}: {e:#}", p.display()))
    };
    let data = read(&cmd.data)?;
    let eval = cmd.eval_data.as_ref().map(read).transpose()?;
    let head = match cmd.head.as_str() {
        "regression" => HeadKind::Regression,
        "classification" => HeadKind::Classification,
        _ => HeadKind::None,
    };
    let template = cmd.template.clone().unwrap_or_else(|| {
        cmd.tags
            .iter()
            .map(|t| format!("<{t}>"))
            .collect::<String>()
            + "{text}"
    });
    let job = TrainJob {
        stage: cmd.stage,
        tags: cmd.tags.clone(),
        template,
        target: cmd.target.clone(),
        head,
        hyperparameters: cmd.hyperparameters(),
    };
    let frozen = std::sync::Arc::new(tags.clone_tags());
    let mut trainer = Trainer::new(&m, frozen, job, &data, eval.as_ref())?;
    if let Some(mb) = cmd.prefix_cache_mb {
        trainer.set_prefix_cache_budget(mb << 20);
    }
    let bar = indicatif::ProgressBar::new(trainer.total_steps() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
    )?);
    let mut log = cmd
        .log
        .as_ref()
        .map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
        })
        .transpose()?;
    let started = std::time::Instant::now();
    let trained = trainer.run(None, &mut |p: &tagllm::train::Progress| {
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            let line = serde_json::json!({"step": p.step, "loss": p.loss, "learning_rate": p.learning_rate,
                "eval": p.eval, "seconds": started.elapsed().as_secs_f64()});
            if let Err(e) = writeln!(f, "{line}") {
                eprintln!("warning: cannot write the training log: {e}");
            }
        }
        bar.set_position(p.step as u64);
        let best = p
            .best_eval_loss
            .map(|b| format!(" best eval {b:.4}"))
            .unwrap_or_default();
        bar.set_message(format!("loss {:.4}{best}", p.loss));
        true
    })?;
    bar.finish();
    for b in &trained.bundles {
        let version = b.save(&cmd.tags_dir)?;
        eprintln!(
            "wrote {} v{} to {}",
            b.name(),
            version,
            cmd.tags_dir.join(b.name()).display()
        );
    }
    println!(
        "{}",
        serde_json::json!({"tags": trained.bundles.iter().map(|b| b.name()).collect::<Vec<_>>(), "eval": trained.eval, "best_step": trained.best_step, "steps_run": trained.steps_run})
    );
    Ok(())
}

fn eval(cmd: EvalCmd) -> Result<()> {
    use tagllm::infer::Prediction;
    use tagllm::tags::{HeadSpec, Template};
    let (m, set) = model_and_tags(&cmd.model, &cmd.tags_dir)?;
    let tag = set.get(&cmd.function).ok_or_else(|| {
        anyhow::anyhow!("no tag <{}> in {}", cmd.function, cmd.tags_dir.display())
    })?;
    let head = tag
        .head
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("<{}> has no head to evaluate", cmd.function))?;
    let template = Template::parse(
        tag.manifest
            .template
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("<{}> has no template", cmd.function))?,
    );
    let target = cmd
        .target
        .clone()
        .or_else(|| {
            tag.manifest
                .provenance
                .get("target")
                .and_then(|t| t.as_str())
                .map(String::from)
        })
        .ok_or_else(|| anyhow::anyhow!("say which field holds the labels: --target"))?;
    let data = tagllm::train::Dataset::from_jsonl(&std::fs::read_to_string(&cmd.data)?)?;
    data.require_fields(&[target.as_str()])?;
    let preds = in_batches(&m, &set, &template, &data, Some(&cmd.function), |seqs| {
        tagllm::infer::engine::padded_heads(&m, seqs)
    })?;
    let metrics = match &head.spec {
        HeadSpec::Regression { .. } => {
            let want = data.numeric(&target)?;
            let got: Vec<f64> = preds
                .iter()
                .map(|p| {
                    if let Prediction::Value { value } = p {
                        *value
                    } else {
                        f64::NAN
                    }
                })
                .collect();
            serde_json::to_value(tagllm::train::metrics::regression(&got, &want))?
        }
        HeadSpec::Classification { .. } => {
            let right = preds
                .iter()
                .zip(&data.records)
                .filter(
                    |(p, r)| matches!(p, Prediction::Class { label, .. } if *label == r[&target]),
                )
                .count();
            serde_json::json!({"accuracy": right as f64 / data.records.len() as f64, "n": data.records.len()})
        }
    };
    println!(
        "{}",
        serde_json::json!({"tag": cmd.function, "version": tag.version(), "metrics": metrics})
    );
    Ok(())
}

/// An API key flag whose empty value means "no key".
#[derive(Clone)]
struct NonEmptyKey(Option<String>);

fn non_empty_key(s: &str) -> Result<NonEmptyKey, String> {
    Ok(NonEmptyKey((!s.is_empty()).then(|| s.to_string())))
}

fn embed(cmd: EmbedCmd) -> Result<()> {
    use std::io::Write;
    let (m, set) = model_and_tags(&cmd.model, &cmd.tags_dir)?;
    let template = tagllm::tags::Template::parse(&cmd.template);
    let data = tagllm::train::Dataset::from_jsonl(&std::fs::read_to_string(&cmd.data)?)?;
    data.require_fields(&template.slots())?;
    let rows = in_batches(&m, &set, &template, &data, None, |seqs| {
        tagllm::infer::engine::padded_last_hidden(&m, seqs)
    })?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for row in rows {
        writeln!(out, "{}", serde_json::to_string(&row)?)?;
    }
    Ok(())
}

/// The model and the tags in `tags_dir`: what `train`, `eval` and `embed` start from.
fn model_and_tags(
    model: &ModelArgs,
    tags_dir: &std::path::Path,
) -> Result<(
    tagllm::model::BaseModel,
    std::sync::Arc<tagllm::tags::TagSet>,
)> {
    let m = model.load()?;
    let identity = tagllm::tags::BaseModelIdentity::of(&m);
    let registry = tagllm::tags::Registry::open(tags_dir, identity, m.device().clone())?;
    let tags = registry.snapshot();
    Ok((m, tags))
}

/// Composes every record with `template` and runs `forward` on batches of 16.
fn in_batches<T>(
    m: &tagllm::model::BaseModel,
    set: &tagllm::tags::TagSet,
    template: &tagllm::tags::Template,
    data: &tagllm::train::Dataset,
    function: Option<&str>,
    forward: impl Fn(&[&tagllm::infer::Composed]) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let slots = template.slots();
    let mut out = Vec::with_capacity(data.records.len());
    for chunk in data.records.chunks(16) {
        let composed = chunk
            .iter()
            .map(|r| {
                let input = tagllm::train::data::slot_input(r, &slots);
                let max = m.config().max_position_embeddings;
                tagllm::infer::compose(m, set, template, &input, function, max)
                    .map_err(anyhow::Error::from)
            })
            .collect::<Result<Vec<_>>>()?;
        out.extend(forward(&composed.iter().collect::<Vec<_>>())?);
    }
    Ok(out)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args)?,
        Command::Worker(cmd) => worker(cmd)?,
        Command::Train(cmd) => train(cmd)?,
        Command::Eval(cmd) => eval(cmd)?,
        Command::Embed(cmd) => embed(cmd)?,
        Command::Openapi => println!("{}", tagllm::http::openapi_json()),
        Command::Tags {
            command: TagsCommand::Seed { tags_dir, from },
        } => {
            let report = tagllm::tags::seed::seed_tags(&from, &tags_dir)?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Tags {
            command:
                TagsCommand::ExportPeft {
                    model,
                    tags_dir,
                    name,
                    out,
                },
        } => {
            let m = model.load()?;
            let identity = tagllm::tags::BaseModelIdentity::of(&m);
            let bundle =
                tagllm::tags::TagBundle::load(&tags_dir.join(&name), &identity, m.device())?;
            bundle.export_peft(&out, &m.name)?;
            println!("{}", out.display());
        }
        Command::Info { model } => {
            let m = model.load()?;
            let c = m.config();
            let info = serde_json::json!({
                "name": m.name,
                "path": m.path,
                "format": m.format,
                "architecture": "llama",
                "device": device::describe(m.device()),
                "fingerprint": m.fingerprint,
                "parameters": c.parameter_count(),
                "config": c,
                "tokenizer": {
                    "vocab_size": m.tokenizer.vocab_size(),
                    "bos_id": m.tokenizer.bos_id(),
                    "eos_ids": m.tokenizer.eos_ids(),
                    "chat_template": m.tokenizer.chat_template().is_some(),
                },
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Command::Tokenize { model, text } => {
            let m = model.load()?;
            println!(
                "{}",
                serde_json::json!({ "ids": m.tokenizer.encode(&text)? })
            );
        }
        Command::Generate {
            model,
            raw,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            json,
            text,
        } => {
            let m = model.load()?;
            let prompt = if raw {
                text
            } else {
                m.tokenizer.apply_chat_template(&text)?
            };
            let params = GenerationParams {
                max_new_tokens,
                temperature: Some(temperature),
                top_p,
                seed,
                stop: Vec::new(),
            };
            let out = generate(&m, &m.embed_text(&prompt)?, &params)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "ids": out.ids, "text": out.text })
                );
            } else {
                println!("{}", out.text);
            }
        }
        Command::TinyModel { out, format, seed } => {
            match format {
                TinyFormat::Gguf => model::tiny::write_tiny_gguf(
                    &out,
                    candle_core::quantized::GgmlDType::Q4_1,
                    seed,
                    true,
                )?,
                TinyFormat::Hf => model::tiny::write_tiny_hf(&out, seed, true)?,
            }
            println!("{}", out.display());
        }
    }
    Ok(())
}
