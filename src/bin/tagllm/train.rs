//! `tagllm train`: a local training run with a progress bar and a JSONL loss curve.

use std::path::PathBuf;

use anyhow::Result;

use tagllm::jobs::{DatasetRef, TrainRequest};
use tagllm::train::{Dataset, HeadKind, Hyperparameters, TrainJob, Trainer};

use crate::eval::model_and_tags;
use crate::ModelArgs;

#[derive(clap::Args)]
pub(crate) struct TrainCmd {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[arg(long, env = "TAGLLM_TAGS_DIR", default_value = crate::TAGS_DIR)]
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
    /// The head a function tag learns (none: generation).
    #[arg(long, value_enum, default_value_t = HeadKind::None)]
    pub(crate) head: HeadKind,
    /// A regression target's range, LO,HI (QED: 0,1): the head answers within it.
    #[arg(long, value_delimiter = ',', value_name = "LO,HI")]
    pub(crate) target_range: Option<Vec<f64>>,
    /// JSONL training data.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// JSONL held-out data.
    #[arg(long)]
    pub(crate) eval_data: Option<PathBuf>,
    /// `POST /train`'s `hyperparameters`, flag for field, with the same defaults.
    #[command(flatten)]
    pub(crate) hyperparameters: Hyperparameters,
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
    /// The job, through the conversion `POST /train` uses (its default template
    /// included), so the CLI and the API train alike.
    fn job(&self) -> Result<TrainJob> {
        let (tag, tags) = match self.tags.as_slice() {
            [one] => (Some(one.clone()), None),
            many => (None, Some(many.to_vec())),
        };
        let path = |p: &PathBuf| DatasetRef::Path {
            path: p.display().to_string(),
        };
        let request = TrainRequest {
            stage: self.stage,
            tag,
            tags,
            template: self.template.clone(),
            target: self.target.clone(),
            head: self.head,
            target_range: match self.target_range.as_deref() {
                None => None,
                Some(&[lo, hi]) => Some([lo, hi]),
                Some(_) => anyhow::bail!("--target-range takes two numbers, LO,HI"),
            },
            dataset: path(&self.data),
            eval_dataset: self.eval_data.as_ref().map(path),
            hyperparameters: self.hyperparameters.clone(),
        };
        request.to_job().map_err(anyhow::Error::msg)
    }
}

pub(crate) fn train(cmd: TrainCmd) -> Result<()> {
    let (m, tags) = model_and_tags(&cmd.model, &cmd.tags_dir)?;
    let read = |p: &PathBuf| -> Result<Dataset> {
        let text = std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
        Dataset::from_jsonl(&text).map_err(|e| anyhow::anyhow!("{}: {e:#}", p.display()))
    };
    let data = read(&cmd.data)?;
    let eval = cmd.eval_data.as_ref().map(read).transpose()?;
    let job = cmd.job()?;
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
            vec![cmd.hyperparameters.batch_size]
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
