//! How a job trains: every hyperparameter with its default and bounds, and where learned
//! tags start.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// How a head starts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum HeadInit {
    /// Fitted in closed form before step 1 on the frozen features at the function tag
    /// (ridge regression; classification: L2-regularised logistic regression), the
    /// regularisation chosen on the validation split. Step 0 is then a linear probe.
    Fit,
    /// Small random weights (the paper).
    Random,
}

// One declaration for `POST /train`'s `hyperparameters` (serde, OpenAPI) and `tagllm
// train`'s flags (clap): the defaults are `Hyperparameters::default`'s in both.
/// How a job trains; every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Hyperparameters {
    /// Optimizer steps (ignored when `epochs` is set).
    #[arg(long, default_value_t = Hyperparameters::default().steps)]
    pub steps: usize,
    /// Passes over the training data; when above 0 it sets the number of steps.
    #[arg(long, default_value_t = Hyperparameters::default().epochs)]
    pub epochs: f64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = Hyperparameters::default().batch_size)]
    pub batch_size: usize,
    /// Peak learning rate of the tag vectors (cosine schedule with warm-up).
    #[arg(long, default_value_t = Hyperparameters::default().learning_rate)]
    pub learning_rate: f64,
    /// Peak learning rate of the head (same schedule); null: `learning_rate`.
    #[arg(long)]
    pub head_learning_rate: Option<f64>,
    /// Share of the steps spent warming the learning rates up.
    #[arg(long, default_value_t = Hyperparameters::default().warmup_ratio)]
    pub warmup_ratio: f64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = Hyperparameters::default().grad_accum)]
    pub grad_accum: usize,
    /// Vectors per learned tag (p).
    #[arg(long, default_value_t = Hyperparameters::default().num_vectors)]
    pub num_vectors: usize,
    /// Seeds the initialisation, the held-out split and the draw order.
    #[arg(long, default_value_t = Hyperparameters::default().seed)]
    pub seed: u64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = Hyperparameters::default().weight_decay)]
    pub weight_decay: f64,
    /// How learned tags start: `mean` (the paper: the mean token embedding), `text:PHRASE`
    /// (the phrase's token embeddings, cycled or cut to `num_vectors`), `tag:NAME` (a copy
    /// of a served tag's vectors, likewise).
    #[arg(long, default_value_t = Hyperparameters::default().init)]
    pub init: String,
    /// How a head starts.
    #[arg(long, value_enum, default_value_t = Hyperparameters::default().head_init)]
    pub head_init: HeadInit,
    /// How many of the function tag's last positions the head reads, concatenated: 1 reads
    /// the last only (the paper); up to `num_vectors`, the head sees every row of the tag.
    #[arg(long, default_value_t = Hyperparameters::default().head_positions)]
    pub head_positions: usize,
    /// Tanh units of a hidden layer between what the head reads and its output (an MLP
    /// head); 0: the paper's linear head.
    #[arg(long, default_value_t = Hyperparameters::default().head_hidden)]
    pub head_hidden: usize,
    /// After tag training, fit the head again in closed form on the trained tags'
    /// features; the new head is kept only if it does better on held-out data.
    #[arg(long, default_value_t = Hyperparameters::default().head_refit, action = clap::ArgAction::Set)]
    pub head_refit: bool,
    /// Evaluate every this many steps (0: once per epoch, and at the end).
    #[arg(long, default_value_t = Hyperparameters::default().eval_every)]
    pub eval_every: usize,
    /// Stop after this many evaluations without improvement (0: never).
    #[arg(long, default_value_t = Hyperparameters::default().patience)]
    pub patience: usize,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            steps: 1000,
            epochs: 0.0,
            batch_size: 8,
            learning_rate: 1e-4,
            head_learning_rate: None,
            warmup_ratio: 0.03,
            grad_accum: 1,
            num_vectors: 10,
            seed: 0,
            weight_decay: 0.0,
            init: "mean".into(),
            head_init: HeadInit::Fit,
            head_positions: 1,
            head_hidden: 0,
            head_refit: true,
            eval_every: 0,
            patience: 0,
        }
    }
}

/// Upper bounds that keep one job from exhausting a worker (each far above any real run).
const MAX_STEPS: usize = 1_000_000;
/// An init phrase longer than a few hundred tokens is not a phrase; the bound keeps a
/// job's spec small.
const MAX_INIT_BYTES: usize = 4096;
const MAX_EPOCHS: f64 = 10_000.0;
const MAX_BATCH: usize = 4096;
const MAX_GRAD_ACCUM: usize = 1024;
/// An MLP head's hidden units at most: its hidden layer is `[units, positions * d]`.
const MAX_HEAD_HIDDEN: usize = 4096;

impl Hyperparameters {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=MAX_STEPS).contains(&self.steps),
            "steps must be in 1..={MAX_STEPS}"
        );
        ensure!(
            self.epochs == 0.0 || (self.epochs > 0.0 && self.epochs <= MAX_EPOCHS),
            "epochs must be 0 (use steps) or in (0, {MAX_EPOCHS}]"
        );
        ensure!(
            (1..=MAX_BATCH).contains(&self.batch_size),
            "batch_size must be in 1..={MAX_BATCH}"
        );
        ensure!(
            (1..=MAX_GRAD_ACCUM).contains(&self.grad_accum),
            "grad_accum must be in 1..={MAX_GRAD_ACCUM}"
        );
        for (name, lr) in [
            ("learning_rate", Some(self.learning_rate)),
            ("head_learning_rate", self.head_learning_rate),
        ] {
            if let Some(lr) = lr {
                ensure!(lr > 0.0 && lr <= 10.0, "{name} must be in (0, 10]");
            }
        }
        ensure!(
            (0.0..1.0).contains(&self.warmup_ratio),
            "warmup_ratio must be in [0, 1)"
        );
        ensure!(
            (0.0..=1.0).contains(&self.weight_decay),
            "weight_decay must be in [0, 1]"
        );
        ensure!(
            (1..=256).contains(&self.num_vectors),
            "num_vectors must be in 1..=256"
        );
        ensure!(
            (1..=self.num_vectors).contains(&self.head_positions),
            "head_positions must be in 1..=num_vectors ({})",
            self.num_vectors
        );
        ensure!(
            self.head_hidden <= MAX_HEAD_HIDDEN,
            "head_hidden must be in 0..={MAX_HEAD_HIDDEN}"
        );
        ensure!(
            self.eval_every <= MAX_STEPS,
            "eval_every must be in 0..={MAX_STEPS} (0: once per epoch)"
        );
        ensure!(
            self.init.len() <= MAX_INIT_BYTES,
            "init must be at most {MAX_INIT_BYTES} bytes (its phrase is tokenised into the tag's start)"
        );
        TagInit::parse(&self.init)?;
        Ok(())
    }

    /// Optimizer steps for a training set of `n` examples.
    pub fn total_steps(&self, n: usize) -> usize {
        if self.epochs > 0.0 {
            let per_step = (self.batch_size * self.grad_accum) as f64;
            ((self.epochs * n as f64 / per_step).ceil() as usize).clamp(1, MAX_STEPS)
        } else {
            self.steps
        }
    }
}

/// Where learned tag vectors start (`Hyperparameters::init`).
#[derive(Debug, Clone, PartialEq)]
pub enum TagInit {
    Mean,
    Text(String),
    Tag(String),
}

impl TagInit {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.split_once(':') {
            None if s == "mean" => Self::Mean,
            Some(("text", phrase)) if !phrase.trim().is_empty() => Self::Text(phrase.to_string()),
            Some(("tag", name)) if crate::tags::template::is_valid_tag_name(name) => {
                Self::Tag(name.to_string())
            }
            _ => bail!("init must be `mean`, `text:PHRASE` or `tag:NAME`, not {s:?}"),
        })
    }
}
