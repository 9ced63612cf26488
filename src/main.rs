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
    /// Request body size limit in bytes; larger bodies get 413.
    #[arg(long, env = "TAGLLM_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Bearer token required on every route but /health.
    #[arg(long, env = "TAGLLM_API_KEY")]
    api_key: Option<String>,
    /// Bearer token required for routes that change state (tag reload, ...).
    #[arg(long, env = "TAGLLM_ADMIN_API_KEY")]
    admin_api_key: Option<String>,
    /// Do not watch the tags directory (POST /tags/reload still rescans).
    #[arg(long, env = "TAGLLM_NO_WATCH")]
    no_watch: bool,
}

#[derive(Subcommand)]
enum TagsCommand {
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .init();
    let loopback = args.host == "127.0.0.1" || args.host == "localhost" || args.host == "::1";
    if !loopback && args.api_key.is_none() {
        tracing::warn!(host = %args.host, "listening beyond loopback without --api-key: anyone who can reach it can use it");
    }
    let device = device::parse_device(&args.model.device)?;
    std::fs::create_dir_all(&args.data_dir)?;
    let state = tagllm::http::new_state(tagllm::http::ServerConfig {
        api_key: args.api_key.clone(),
        admin_api_key: args.admin_api_key.clone(),
        max_concurrent_requests: args.max_concurrent_requests,
        max_body_bytes: args.max_body_bytes,
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
        tracing::info!(addr = %listener.local_addr()?, "listening; loading the model");
        let loading = state.clone();
        let limits = tagllm::infer::Limits {
            max_input_tokens: args.max_input_tokens,
            max_batch_inputs: args.max_batch_inputs,
            max_new_tokens: args.max_new_tokens,
        };
        let engine = tagllm::infer::EngineConfig { max_batch_tokens: args.max_batch_tokens, ..Default::default() };
        let watch = !args.no_watch;
        let model_path = args.model.model.clone();
        let tags_dir = args.tags_dir.clone();
        tokio::task::spawn_blocking(move || {
            match tagllm::infer::Predictor::load(&model_path, &device, &tags_dir, watch, limits, engine, &loading.metrics.registry) {
                Ok(p) => {
                    tracing::info!(model = %p.model.name, tags = p.registry.snapshot().tags.len(), "ready");
                    let _ = loading.predictor.set(std::sync::Arc::new(p));
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "loading failed");
                    std::process::exit(1);
                }
            }
        });
        tagllm::http::serve(listener, state).await
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args)?,
        Command::Openapi => println!("{}", tagllm::http::openapi_json()),
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
            let identity = tagllm::tags::BaseModelIdentity {
                fingerprint: m.fingerprint.clone(),
                hidden_size: m.config().hidden_size,
            };
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
