//! `tagllm train`: a local training run with a progress bar and a JSONL loss curve.

use std::path::PathBuf;

use anyhow::Result;

use crate::eval::model_and_tags;
use crate::ModelArgs;

#[derive(clap::Args)]
pub(crate) struct TrainCmd {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = "tags")]
    pub(crate) tags_dir: PathBuf,
    /// 1: domain tags; 2: a single-domain function tag; 3: cross-domain / multi-task.
    #[arg(long)]
    pub(crate) stage: u8,
    /// The tag to learn (repeat for several domain tags in stage 1).
    #[arg(long = "tag", required = true)]
    pub(crate) tags: Vec<String>,
    /// Default for stage 1: `<TAG>{text}`.
    #[arg(long)]
    pub(crate) template: Option<String>,
    /// The labelled field (stages 2 and 3).
    #[arg(long)]
    pub(crate) target: Option<String>,
    #[arg(long, value_parser = ["regression", "classification", "none"], default_value = "none")]
    pub(crate) head: String,
    /// JSONL training data.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// JSONL held-out data.
    #[arg(long)]
    pub(crate) eval_data: Option<PathBuf>,
    // Hyperparameters left out take the defaults `POST /train` uses
    // (`Hyperparameters::default`), so the CLI and the API train alike.
    #[arg(long)]
    pub(crate) steps: Option<usize>,
    /// Passes over the training data; sets the number of steps when given.
    #[arg(long)]
    pub(crate) epochs: Option<f64>,
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Peak learning rate of the tag vectors.
    #[arg(long)]
    pub(crate) learning_rate: Option<f64>,
    /// Peak learning rate of the head (default: --learning-rate).
    #[arg(long)]
    pub(crate) head_learning_rate: Option<f64>,
    #[arg(long)]
    pub(crate) warmup_ratio: Option<f64>,
    #[arg(long)]
    pub(crate) grad_accum: Option<usize>,
    #[arg(long)]
    pub(crate) num_vectors: Option<usize>,
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    #[arg(long)]
    pub(crate) weight_decay: Option<f64>,
    /// Where tag vectors start: `mean`, `text:PHRASE` or `tag:NAME`.
    #[arg(long)]
    pub(crate) init: Option<String>,
    /// `fit` (closed form on the step-0 features) or `random`.
    #[arg(long, value_parser = ["fit", "random"])]
    pub(crate) head_init: Option<String>,
    /// How many of the function tag's last positions the head reads, concatenated
    /// (1: the last only; up to --num-vectors).
    #[arg(long)]
    pub(crate) head_positions: Option<usize>,
    /// After tag training, refit the head in closed form on the trained tags' features
    /// (kept only if better on held-out data).
    #[arg(long)]
    pub(crate) head_refit: Option<bool>,
    /// Evaluate every N steps (0: every epoch).
    #[arg(long)]
    pub(crate) eval_every: Option<usize>,
    /// Stop after this many evaluations without improvement (0: never).
    #[arg(long)]
    pub(crate) patience: Option<usize>,
    /// Memory for the frozen-prefix cache, MiB (default: half the available memory).
    #[arg(long, env = "TAGLLM_PREFIX_CACHE_MB")]
    pub(crate) prefix_cache_mb: Option<usize>,
    /// Before training, short runs from the same start at each of these tag learning
    /// rates (comma-separated) × each of `--sweep-batch-sizes`; the job then trains with
    /// the pair of lowest held-out loss. Needs held-out data.
    #[arg(long, value_delimiter = ',')]
    pub(crate) sweep_learning_rates: Vec<f64>,
    /// Batch sizes of the sweep (default: --batch-size).
    #[arg(long, value_delimiter = ',')]
    pub(crate) sweep_batch_sizes: Vec<usize>,
    /// Steps of each sweep run.
    #[arg(long, default_value_t = 60)]
    pub(crate) sweep_steps: usize,
    /// Evaluate each sweep run every N steps (default: a third of its steps).
    #[arg(long)]
    pub(crate) sweep_eval_every: Option<usize>,
    /// Appends one JSON line per step (step, loss, learning rate, eval metrics when
    /// evaluated, seconds since start): the loss curve.
    #[arg(long)]
    pub(crate) log: Option<PathBuf>,
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
            head_positions: self.head_positions.unwrap_or(d.head_positions),
            head_refit: self.head_refit.unwrap_or(d.head_refit),
            eval_every: self.eval_every.unwrap_or(d.eval_every),
            patience: self.patience.unwrap_or(d.patience),
        }
    }
}

pub(crate) fn train(cmd: TrainCmd) -> Result<()> {
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
    let mut write_log = |p: &tagllm::train::Progress, sweep: Option<&tagllm::train::SweepRun>| {
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            let mut line = serde_json::json!({"step": p.step, "loss": p.loss, "learning_rate": p.learning_rate,
                "eval": p.eval, "eval_loss": p.eval_loss, "examples": p.examples, "positions": p.positions,
                "seconds": started.elapsed().as_secs_f64()});
            if let Some(run) = sweep {
                line["sweep"] = serde_json::json!({"learning_rate": run.learning_rate, "batch_size": run.batch_size});
            }
            if let Err(e) = writeln!(f, "{line}") {
                eprintln!("warning: cannot write the training log: {e}");
            }
        }
    };
    if !cmd.sweep_learning_rates.is_empty() {
        let batch_sizes = if cmd.sweep_batch_sizes.is_empty() {
            vec![cmd.hyperparameters().batch_size]
        } else {
            cmd.sweep_batch_sizes.clone()
        };
        let eval_every = cmd.sweep_eval_every.unwrap_or((cmd.sweep_steps / 3).max(1));
        let runs = trainer.sweep(
            &cmd.sweep_learning_rates,
            &batch_sizes,
            cmd.sweep_steps,
            eval_every,
            &mut |run, p| {
                write_log(p, Some(run));
                if let Some(e) = p.eval_loss {
                    eprintln!(
                        "sweep lr {} batch {}: step {}/{} loss {:.4} held-out {e:.5}",
                        run.learning_rate, run.batch_size, p.step, p.total_steps, p.loss
                    );
                }
                true
            },
        )?;
        for r in &runs {
            eprintln!(
                "sweep lr {} batch {}: best held-out loss {:.5} at step {}, {:.2} s/step",
                r.learning_rate, r.batch_size, r.best_eval_loss, r.best_step, r.seconds_per_step
            );
        }
        bar.set_length(trainer.total_steps() as u64);
    }
    let trained = trainer.run(None, &mut |p: &tagllm::train::Progress| {
        write_log(p, None);
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
