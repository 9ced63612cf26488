//! What a training run is asked to do (`TrainJob`, `Hyperparameters`) and the checks that
//! turn a job plus its data into a runnable plan, with errors that name the tag, slot,
//! field or line at fault.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::data::{Dataset, Record};
use crate::tags::{TagKind, TagSet, Template};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    Regression,
    Classification,
    None,
}

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

/// What to learn.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainJob {
    /// 1: domain tags (next-token prediction); 2: a single-domain function tag;
    /// 3: a cross-domain / multi-task function tag.
    pub stage: u8,
    /// The tags being learned: one or more domain tags (stage 1), one function tag (2, 3).
    pub tags: Vec<String>,
    /// e.g. `<Protein>{text}` (stage 1) or `... <SMILES> {smiles} ... <QED>`.
    pub template: String,
    /// The labelled field (stages 2 and 3).
    pub target: Option<String>,
    pub head: HeadKind,
    /// A regression target's range, `[lo, hi]`: the head's answers are kept within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_range: Option<[f64; 2]>,
    pub hyperparameters: Hyperparameters,
}

/// What a learned tag's output is trained against.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// Next-token prediction on the text after the tag (stage 1).
    Lm,
    /// A regression head on standardised targets, answering within `range` if given.
    Regression {
        mean: f64,
        std: f64,
        range: Option<[f64; 2]>,
    },
    Classification {
        labels: Vec<String>,
    },
    /// No head: the LM head generates the target text.
    Generation,
}

/// A record may carry its own template under this field (multi-task data such as one
/// translation direction per record); the job's template is the default and the one
/// the published tag keeps.
pub const RECORD_TEMPLATE_FIELD: &str = "template";

pub(super) fn record_template<'r>(record: &'r Record, default: &'r str) -> &'r str {
    record
        .get(RECORD_TEMPLATE_FIELD)
        .map_or(default, String::as_str)
}

/// A job checked against the served tags and its data.
pub(super) struct Plan {
    /// Every template the data uses (the job's included), parsed once.
    pub templates: BTreeMap<String, Template>,
    pub target: Target,
}

/// Checks that every record has the slots of its own template (or of the job's).
fn require_slots(
    data: &Dataset,
    templates: &BTreeMap<String, Template>,
    default: &str,
) -> Result<()> {
    for (i, r) in data.records.iter().enumerate() {
        let template = &templates[record_template(r, default)];
        if let Some(missing) = template.slots().into_iter().find(|s| !r.contains_key(*s)) {
            bail!("line {}: missing field `{missing}`", i + 1);
        }
    }
    Ok(())
}

/// Validates `job` against the frozen tags and the data, without touching the model.
pub(super) fn plan(
    job: &TrainJob,
    frozen: &TagSet,
    data: &Dataset,
    eval: Option<&Dataset>,
) -> Result<Plan> {
    ensure!((1..=3).contains(&job.stage), "stage must be 1, 2 or 3");
    job.hyperparameters.validate()?;
    ensure!(!job.tags.is_empty(), "name the tag(s) to learn");
    for t in &job.tags {
        ensure!(
            crate::tags::template::is_valid_tag_name(t),
            "`{t}` is not a valid tag name"
        );
    }
    if let TagInit::Tag(from) = TagInit::parse(&job.hyperparameters.init)? {
        ensure!(
            frozen.get(&from).is_some(),
            "init: no served tag <{from}> to copy"
        );
    }
    // Every template the data uses: the job's, and any a record carries itself.
    let mut texts = vec![job.template.clone()];
    for r in data
        .records
        .iter()
        .chain(eval.iter().flat_map(|e| e.records.iter()))
    {
        if let Some(t) = r.get(RECORD_TEMPLATE_FIELD) {
            if !texts.contains(t) {
                texts.push(t.clone());
            }
        }
    }
    for t in &texts {
        crate::tags::template::check_size(t).map_err(anyhow::Error::msg)?;
    }
    let per_record = texts.len() > 1;
    let templates: BTreeMap<String, Template> = texts
        .iter()
        .map(|t| (t.clone(), Template::parse(t)))
        .collect();
    for text in &texts {
        let which = if per_record {
            format!("template {text:?}")
        } else {
            "the template".to_string()
        };
        check_template(job, frozen, &templates[text], &which)?;
    }
    require_slots(data, &templates, &job.template)?;
    if let Some(e) = eval {
        require_slots(e, &templates, &job.template)?;
    }
    let target = target(job, data)?;
    if let (Target::Regression { range: Some(r), .. }, Some(field)) = (&target, &job.target) {
        for (what, set) in std::iter::once(("training", data)).chain(eval.map(|e| ("held-out", e)))
        {
            check_in_range(&set.numeric(field)?, *r, field, what)?;
        }
    }
    ensure!(
        job.hyperparameters.head_positions == 1
            || matches!(
                target,
                Target::Regression { .. } | Target::Classification { .. }
            ),
        "head_positions needs a regression or classification head"
    );
    ensure!(
        job.hyperparameters.head_hidden == 0
            || matches!(
                target,
                Target::Regression { .. } | Target::Classification { .. }
            ),
        "head_hidden needs a regression or classification head"
    );
    Ok(Plan { templates, target })
}

fn check_template(job: &TrainJob, frozen: &TagSet, template: &Template, which: &str) -> Result<()> {
    for t in &job.tags {
        ensure!(
            template.tags().contains(&t.as_str()),
            "{which} never uses <{t}>"
        );
    }
    for t in template.tags() {
        if !job.tags.iter().any(|l| l == t) {
            let b = frozen.get(t).with_context(|| {
                format!("unknown tag <{t}>: train it first or fix the template")
            })?;
            ensure!(
                b.manifest.kind == TagKind::Domain || job.stage == 3,
                "<{t}> is a function tag; only stage 3 composes with other function tags"
            );
        }
    }
    let slots = template.slots();
    ensure!(!slots.is_empty(), "{which} has no {{slot}} for the data");
    if let Some(field) = job.target.as_deref() {
        ensure!(
            !slots.contains(&field),
            "the target `{field}` must not also be a template slot"
        );
    }
    if job.stage == 2 {
        let domains = template
            .tags()
            .iter()
            .filter(|t| !job.tags.iter().any(|l| l == *t))
            .count();
        ensure!(
            domains <= 1,
            "stage 2 is single-domain: {which} has {domains} other tags (use stage 3)"
        );
    }
    Ok(())
}

/// Every target value lies in the range the head will answer within: a value outside it
/// could never be predicted, so the range or the data is wrong.
fn check_in_range(values: &[f64], [lo, hi]: [f64; 2], field: &str, what: &str) -> Result<()> {
    match values.iter().position(|v| !(lo..=hi).contains(v)) {
        Some(i) => bail!(
            "{what} data line {}: `{field}` is {}, outside target_range [{lo}, {hi}]",
            i + 1,
            values[i]
        ),
        None => Ok(()),
    }
}

fn target(job: &TrainJob, data: &Dataset) -> Result<Target> {
    if let Some([lo, hi]) = job.target_range {
        ensure!(
            job.head == HeadKind::Regression,
            "target_range is for a regression head"
        );
        ensure!(
            lo.is_finite() && hi.is_finite() && lo < hi,
            "target_range must be two finite numbers, the first below the second"
        );
    }
    Ok(match (job.stage, job.head) {
        (1, HeadKind::None) => {
            ensure!(
                job.target.is_none(),
                "stage 1 learns from unlabelled text: no target"
            );
            Target::Lm
        }
        (1, _) => bail!("stage 1 (domain tags) has no head"),
        (_, head) => {
            ensure!(
                job.tags.len() == 1,
                "stages 2 and 3 learn exactly one function tag"
            );
            let field = job
                .target
                .as_deref()
                .context("stages 2 and 3 need `target`: the labelled field")?;
            match head {
                HeadKind::Regression => {
                    let v = data.numeric(field)?;
                    let mean = v.iter().sum::<f64>() / v.len() as f64;
                    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
                    Target::Regression {
                        mean,
                        std: var.sqrt().max(1e-8),
                        range: job.target_range,
                    }
                }
                HeadKind::Classification => Target::Classification {
                    labels: data.labels(field)?,
                },
                HeadKind::None => {
                    data.require_fields(&[field])?;
                    Target::Generation
                }
            }
        }
    })
}

/// Checks a job against the served tags and its data without building anything heavy:
/// what `POST /train` needs before it queues a job. Returns the run's optimizer steps.
pub fn check(
    job: &TrainJob,
    frozen: &TagSet,
    data: &Dataset,
    eval: Option<&Dataset>,
) -> Result<usize> {
    plan(job, frozen, data, eval)?;
    Ok(job.hyperparameters.total_steps(data.records.len()))
}

#[cfg(test)]
mod tests;
