//! The training run: a job checked and turned into examples (`Trainer::new`), the
//! starting point (tag initialisation, the head fitted in closed form, the step-0
//! evaluation), the optimisation loop with evaluation, early stopping and checkpoints,
//! and the published bundles of the best evaluated point, step 0 included. The base model
//! is frozen; only tag vectors (and a function tag's head) are learned.
//!
//! Neighbours: `job` (validation), `examples` (records -> examples), `forward` (the
//! model-facing half), `evaluate`, `init` (initialisations and head fits).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::checkpoint::Checkpoint;
use super::data::Dataset;
use super::evaluate::EVAL_BATCH;
use super::examples::{self, Example};
use super::init::{fit_logistic, fit_ridge, tag_init};
use super::job::{self, HeadInit, TagInit, Target, TrainJob};
use super::optim::AdamW;
use super::prefix_cache::{default_budget, PrefixCache};
use super::schedule::cosine_with_warmup;
use crate::model::{BaseModel, Mode};
use crate::tags::{Head, HeadSpec, TagBundle, TagKind, TagManifest, TagSet, Template};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub learning_rate: f64,
    /// Latest held-out evaluation.
    pub eval: Option<serde_json::Value>,
    /// Held-out loss measured at this step (evaluation steps only).
    pub eval_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    /// Examples in the step's (micro-)batches.
    pub examples: usize,
    /// Positions the step's forward passes covered: examples x longest example of each
    /// (micro-)batch, frozen prefixes included (what a step's time scales with).
    pub positions: usize,
}

/// What a run reports to, and asks of, whoever runs it.
pub trait Hooks {
    /// After every step; returning false cancels the run.
    fn progress(&mut self, p: &Progress) -> bool;
    /// Checkpoint every this many steps (0: only at the end).
    fn every(&self) -> usize {
        0
    }
    fn checkpoint(&mut self, _c: &Checkpoint) -> Result<()> {
        Ok(())
    }
}

/// Hooks from a progress closure alone.
impl<F: FnMut(&Progress) -> bool> Hooks for F {
    fn progress(&mut self, p: &Progress) -> bool {
        self(p)
    }
}

pub struct Trained {
    pub bundles: Vec<TagBundle>,
    /// The held-out metrics of the published point, with the step-0 ones under `step0`.
    pub eval: serde_json::Value,
    /// 0 when no step beat the initialisation.
    pub best_step: usize,
    pub steps_run: usize,
}

pub struct Trainer<'a> {
    pub(super) model: &'a BaseModel,
    pub(super) job: TrainJob,
    pub(super) frozen: Arc<TagSet>,
    pub(super) target: Target,
    pub(super) learned: BTreeMap<String, Var>,
    pub(super) head: Option<(Var, Var)>,
    pub(super) train: Vec<Example>,
    pub(super) eval: Vec<Example>,
    pub(super) eval_values: Vec<f64>,
    total_steps: usize,
    /// Keys/values of each example's frozen prefix, kept across the run.
    pub(super) prefixes: Mutex<PrefixCache>,
    /// The draw order of the epoch last asked for: `(epoch, order)`.
    order: Mutex<Option<(u64, Arc<Vec<usize>>)>>,
    /// How the head was fitted before step 1 (provenance).
    head_fit: Option<serde_json::Value>,
    /// The head fitted again on the trained tags' features (provenance).
    head_refit: Option<serde_json::Value>,
    /// The sweep that chose the learning rate and batch size, if one ran (provenance).
    sweep_record: Option<serde_json::Value>,
    /// The initialised parameters and their held-out evaluation, once set up.
    start: Option<Start>,
}

/// Where every run of a trainer starts: parameters after initialisation (and the head
/// fit) with their held-out loss and metrics.
struct Start {
    snapshot: Vec<Tensor>,
    eval: Option<(f64, serde_json::Value)>,
}

/// The optimisation's state between steps (what a checkpoint keeps, and the latest
/// evaluation).
struct Descent {
    /// Steps taken.
    step: usize,
    /// Lowest held-out loss, its step and parameters.
    best: Option<(f64, usize, Vec<Tensor>)>,
    evals_without_gain: usize,
    last_eval: Option<serde_json::Value>,
    last_eval_loss: Option<f64>,
    initial_eval: Option<serde_json::Value>,
}

/// One short run of a learning-rate / batch-size sweep.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SweepRun {
    pub learning_rate: f64,
    pub head_learning_rate: Option<f64>,
    pub batch_size: usize,
    pub steps: usize,
    /// Lowest held-out loss of the run (step 0 included) and its step.
    pub best_eval_loss: f64,
    pub best_step: usize,
    pub last_eval_loss: f64,
    pub seconds_per_step: f64,
}

/// Without an eval set, training data this large gives up 10% for held-out evaluation.
const HOLD_OUT_MIN_EXAMPLES: usize = 10;

/// Batches are formed within windows of this many batches, sorted by length, so that a
/// batch's examples have similar lengths (little padding) while the order stays random.
const BUCKET_WINDOW_BATCHES: usize = 50;

impl<'a> Trainer<'a> {
    /// Validates the job against the model, the frozen tags and the data, and prepares
    /// every example. Errors are for people: they name the tag, slot, field or line.
    pub fn new(
        model: &'a BaseModel,
        frozen: Arc<TagSet>,
        job: TrainJob,
        data: &Dataset,
        eval: Option<&Dataset>,
    ) -> Result<Self> {
        let plan = job::plan(&job, &frozen, data, eval)?;
        let h = &job.hyperparameters;
        let init = tag_init(model, &frozen, &TagInit::parse(&h.init)?, h.num_vectors)?;
        let with_head = matches!(
            plan.target,
            Target::Regression { .. } | Target::Classification { .. }
        );
        let set = examples::compose_set(&frozen, &job.tags, h.num_vectors, with_head)?;
        let learned = job
            .tags
            .iter()
            .map(|t| Ok((t.clone(), Var::from_tensor(&init)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let head = random_head(model, &plan.target, h.head_positions, h.seed)?;
        let build = |d: &Dataset, base: usize| {
            examples::build(model, &job, &plan.target, &plan.templates, &set, d, base)
        };
        let mut train = build(data, 0)?;
        let mut held = match eval {
            Some(e) => build(e, train.len())?,
            None => Vec::new(),
        };
        if eval.is_none() && train.len() >= HOLD_OUT_MIN_EXAMPLES {
            // No held-out set given: hold out a seeded 10% (at most 200) of the training data.
            let n = (train.len() / 10).clamp(1, 200);
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut StdRng::seed_from_u64(h.seed));
            let out: HashSet<usize> = order[..n].iter().copied().collect();
            let (e, t): (Vec<_>, Vec<_>) = std::mem::take(&mut train)
                .into_iter()
                .enumerate()
                .partition(|(i, _)| out.contains(i));
            train = t.into_iter().map(|(_, x)| x).collect();
            held = e.into_iter().map(|(_, x)| x).collect();
        }
        ensure!(!train.is_empty(), "no training examples");
        let total_steps = h.total_steps(train.len());
        let mut trainer = Self {
            model,
            frozen,
            target: plan.target,
            learned,
            head,
            eval_values: held.iter().map(|e| e.value).collect(),
            train,
            eval: held,
            total_steps,
            prefixes: Mutex::new(PrefixCache::new(0, 0)),
            order: Mutex::new(None),
            head_fit: None,
            head_refit: None,
            sweep_record: None,
            start: None,
            job,
        };
        trainer.set_prefix_cache_budget(default_budget());
        Ok(trainer)
    }

    /// Bytes the frozen-prefix cache may hold (default: half the available memory).
    pub fn set_prefix_cache_budget(&mut self, bytes: usize) {
        let c = self.model.config();
        let per_position = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4;
        let full: usize = self
            .train
            .iter()
            .chain(&self.eval)
            .map(|e| e.first_learned * per_position)
            .sum();
        self.prefixes = Mutex::new(PrefixCache::new(bytes, full));
    }

    /// `(examples cached, bytes, storage dtype)` of the frozen-prefix cache.
    pub fn prefix_cache_usage(&self) -> (usize, usize, DType) {
        let p = self.prefixes.lock().unwrap_or_else(PoisonError::into_inner);
        let (n, bytes) = p.usage();
        (n, bytes, p.storage())
    }

    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// Optimizer steps of a full run (from `steps`, or from `epochs` and the data).
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// How many hidden states the head reads (`Hyperparameters::head_positions`).
    pub(super) fn head_positions(&self) -> usize {
        self.job.hyperparameters.head_positions
    }

    fn steps_per_epoch(&self) -> usize {
        let h = &self.job.hyperparameters;
        self.train
            .len()
            .div_ceil(h.batch_size * h.grad_accum)
            .max(1)
    }

    /// The draw order of one epoch: a seeded shuffle, then sorted by length within windows
    /// of `BUCKET_WINDOW_BATCHES` batches, cut into batches whose order is shuffled again.
    fn epoch_order(&self, epoch: u64) -> Arc<Vec<usize>> {
        let mut memo = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((e, order)) = memo.as_ref() {
            if *e == epoch {
                return order.clone();
            }
        }
        let h = &self.job.hyperparameters;
        let mut rng = StdRng::seed_from_u64(h.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch);
        let mut perm: Vec<usize> = (0..self.train.len()).collect();
        perm.shuffle(&mut rng);
        let mut batches: Vec<Vec<usize>> = Vec::new();
        for window in perm.chunks(h.batch_size * BUCKET_WINDOW_BATCHES) {
            let mut w = window.to_vec();
            w.sort_by_key(|&i| self.train[i].pieces.len());
            batches.extend(w.chunks(h.batch_size).map(<[usize]>::to_vec));
        }
        // Full batches in random order; a short one (if any) last, so batches stay aligned.
        let short = batches
            .last()
            .filter(|b| b.len() < h.batch_size)
            .is_some()
            .then(|| batches.pop())
            .flatten();
        batches.shuffle(&mut rng);
        batches.extend(short);
        let order = Arc::new(batches.concat());
        *memo = Some((epoch, order.clone()));
        order
    }

    /// The examples of optimizer step `step`: a deterministic function of the seed and the
    /// step, so a resumed run sees exactly the batches an uninterrupted one would.
    fn batch_for(&self, step: usize, micro: usize) -> Vec<usize> {
        let h = &self.job.hyperparameters;
        let n = self.train.len();
        let first = (step * h.grad_accum + micro) * h.batch_size;
        (first..first + h.batch_size)
            .map(|draw| self.epoch_order((draw / n) as u64)[draw % n])
            .collect()
    }

    /// The head's inputs on the training set (final-norm hidden states at the function
    /// tag's readout, with the current tag vectors) and the standardised regression
    /// targets: what the closed-form head fit sees, e.g. for a linear probe.
    pub fn head_features(&self) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
        let Target::Regression { mean, std } = &self.target else {
            bail!("head features are for regression jobs");
        };
        let x = self.features(&self.train, EVAL_BATCH)?;
        Ok((
            x,
            self.train.iter().map(|e| (e.value - mean) / std).collect(),
        ))
    }

    /// Fits the head in closed form on the features at the function tag, computed with the
    /// current tag vectors; the regularisation is chosen on the held-out set. Returns how
    /// (provenance), or nothing for a job without a head.
    fn fit_head(&mut self) -> Result<Option<serde_json::Value>> {
        let Some((w, b)) = self.head.clone() else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let x = self.features(&self.train, EVAL_BATCH)?;
        let xv = self.features(&self.eval, EVAL_BATCH)?;
        let features_seconds = started.elapsed().as_secs_f64();
        let fit = match &self.target {
            Target::Regression { mean, std } => {
                let z = |ex: &[Example]| -> Vec<f64> {
                    ex.iter().map(|e| (e.value - mean) / std).collect()
                };
                let (y, yv) = (z(&self.train), z(&self.eval));
                fit_ridge(&x, &y, Some((&xv, &yv)))?
            }
            Target::Classification { labels } => {
                let c = |ex: &[Example]| -> Vec<u32> { ex.iter().map(|e| e.class).collect() };
                let (y, yv) = (c(&self.train), c(&self.eval));
                fit_logistic(&x, &y, labels.len(), Some((&xv, &yv)))?
            }
            _ => return Ok(None),
        };
        let (fw, fb) = fit.tensors(self.model.device())?;
        w.set(&fw)?;
        b.set(&fb)?;
        Ok(Some(serde_json::json!({
            "method": if matches!(self.target, Target::Regression { .. }) { "ridge" } else { "logistic" },
            "lambda": fit.lambda,
            "validation_loss": fit.validation_loss,
            "train_examples": x.len(),
            // The features pass also fills the frozen-prefix cache for the run.
            "features_seconds": features_seconds,
            "fit_seconds": started.elapsed().as_secs_f64() - features_seconds,
        })))
    }

    /// Runs (or, from `resume`, continues) the optimisation. `hooks.progress` is called
    /// after every step (returning false cancels the run); `hooks.checkpoint` every
    /// `hooks.every` steps and at the end. A fresh run starts from the initialisation (the
    /// head fitted if asked), evaluated as step 0; the published parameters are those of
    /// the best evaluation, step 0 included, with the head refitted on their features when
    /// that helps on held-out data.
    pub fn run(mut self, resume: Option<Checkpoint>, hooks: &mut dyn Hooks) -> Result<Trained> {
        let mut opt = self.optimizer()?;
        let mut descent = match resume {
            Some(c) => {
                self.restore(&c.params)?;
                opt.restore(c.adam_t, c.adam_m, c.adam_v)?;
                Descent {
                    step: c.step,
                    best: c.best,
                    evals_without_gain: c.evals_without_gain,
                    last_eval: c.initial_eval.clone(),
                    last_eval_loss: None,
                    initial_eval: c.initial_eval,
                }
            }
            None => self.start_point()?,
        };
        self.descend(&mut opt, &mut descent, hooks)?;
        let steps_run = descent.step;
        let best_step = match descent.best {
            Some((_, step, snapshot)) => {
                self.restore(&snapshot)?;
                step
            }
            None => steps_run,
        };
        if best_step > 0 {
            self.refit_head()?;
        }
        let (_, mut eval) = self.evaluate()?;
        if let (Some(m), Some(step0)) = (eval.as_object_mut(), descent.initial_eval) {
            m.insert("step0".into(), step0);
        }
        let bundles = self.bundles(&eval, best_step, steps_run)?;
        Ok(Trained {
            bundles,
            eval,
            best_step,
            steps_run,
        })
    }

    /// Short runs from the same start (the head fitted once, the frozen prefixes computed
    /// once), one per learning rate × batch size, each `steps` long and evaluated every
    /// `eval_every` steps; afterwards the job trains with the pair whose best held-out loss
    /// was lowest (the head's rate keeps its ratio to the tags'). `progress` sees every
    /// step of every run with the run's settings; returning false cancels the sweep.
    pub fn sweep(
        &mut self,
        learning_rates: &[f64],
        batch_sizes: &[usize],
        steps: usize,
        eval_every: usize,
        progress: &mut dyn FnMut(&SweepRun, &Progress) -> bool,
    ) -> Result<Vec<SweepRun>> {
        ensure!(
            !self.eval.is_empty(),
            "a sweep needs held-out data to compare its runs"
        );
        ensure!(
            !learning_rates.is_empty() && !batch_sizes.is_empty() && steps > 0,
            "a sweep needs at least one learning rate, one batch size and one step"
        );
        let base = self.job.hyperparameters.clone();
        let head_ratio = base.head_learning_rate.map(|r| r / base.learning_rate);
        let mut runs = Vec::new();
        for &batch_size in batch_sizes {
            for &learning_rate in learning_rates {
                let mut h = base.clone();
                h.learning_rate = learning_rate;
                h.head_learning_rate = head_ratio.map(|r| r * learning_rate);
                h.batch_size = batch_size;
                h.steps = steps;
                h.epochs = 0.0;
                h.eval_every = eval_every;
                h.patience = 0;
                h.validate()?;
                self.set_hyperparameters(h.clone());
                let mut run = SweepRun {
                    learning_rate,
                    head_learning_rate: h.head_learning_rate,
                    batch_size,
                    steps,
                    best_eval_loss: f64::NAN,
                    best_step: 0,
                    last_eval_loss: f64::NAN,
                    seconds_per_step: f64::NAN,
                };
                let mut descent = self.start_point()?;
                let mut opt = self.optimizer()?;
                let started = std::time::Instant::now();
                self.descend(&mut opt, &mut descent, &mut |p: &Progress| {
                    progress(&run, p)
                })?;
                run.seconds_per_step = started.elapsed().as_secs_f64() / steps as f64;
                if let Some((loss, step, _)) = &descent.best {
                    (run.best_eval_loss, run.best_step) = (*loss, *step);
                }
                run.last_eval_loss = descent.last_eval_loss.unwrap_or(f64::NAN);
                runs.push(run);
            }
        }
        let winner = runs
            .iter()
            .min_by(|a, b| a.best_eval_loss.total_cmp(&b.best_eval_loss))
            .context("a sweep of no runs")?
            .clone();
        let mut chosen = base;
        chosen.learning_rate = winner.learning_rate;
        chosen.head_learning_rate = winner.head_learning_rate;
        chosen.batch_size = winner.batch_size;
        self.set_hyperparameters(chosen);
        self.sweep_record = Some(serde_json::json!({"runs": runs, "chosen": winner}));
        Ok(runs)
    }

    /// Replaces the job's hyperparameters (already validated), with what depends on them.
    fn set_hyperparameters(&mut self, h: super::job::Hyperparameters) {
        self.total_steps = h.total_steps(self.train.len());
        self.job.hyperparameters = h;
        *self.order.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// AdamW over the learned parameters, the head at its own rate.
    fn optimizer(&self) -> Result<AdamW> {
        let h = &self.job.hyperparameters;
        let mut opt = AdamW::new(self.vars(), h.learning_rate, h.weight_decay)?;
        let head_scale = h.head_learning_rate.unwrap_or(h.learning_rate) / h.learning_rate;
        let scales = (0..self.vars().len())
            .map(|i| {
                if i < self.learned.len() {
                    1.0
                } else {
                    head_scale
                }
            })
            .collect();
        opt.set_lr_scales(scales)?;
        Ok(opt)
    }

    /// The starting point, set up once per trainer (head fit, step-0 evaluation) and
    /// restored for every run that starts from it.
    fn start_point(&mut self) -> Result<Descent> {
        let start = match self.start.take() {
            Some(s) => {
                self.restore(&s.snapshot)?;
                s
            }
            None => {
                if self.job.hyperparameters.head_init == HeadInit::Fit {
                    self.head_fit = self.fit_head()?;
                }
                let eval = if self.eval.is_empty() {
                    None
                } else {
                    Some(self.evaluate()?)
                };
                Start {
                    snapshot: self.snapshot()?,
                    eval,
                }
            }
        };
        let descent = Descent {
            step: 0,
            best: start
                .eval
                .as_ref()
                .map(|(loss, _)| (*loss, 0, start.snapshot.clone())),
            evals_without_gain: 0,
            last_eval: start.eval.as_ref().map(|(_, m)| m.clone()),
            last_eval_loss: start.eval.as_ref().map(|(loss, _)| *loss),
            initial_eval: start.eval.as_ref().map(|(_, m)| m.clone()),
        };
        self.start = Some(start);
        Ok(descent)
    }

    /// The optimisation loop from `d.step` to the total, with evaluation, early stopping,
    /// progress reports and checkpoints.
    fn descend(&self, opt: &mut AdamW, d: &mut Descent, hooks: &mut dyn Hooks) -> Result<()> {
        let h = &self.job.hyperparameters;
        let total = self.total_steps;
        let eval_every = match h.eval_every {
            0 => self.steps_per_epoch(),
            n => n,
        };
        let stopped_early = |ewg: usize| h.patience > 0 && ewg >= h.patience;
        for step in d.step..total {
            if stopped_early(d.evals_without_gain) {
                break;
            }
            let lr = cosine_with_warmup(step, total, h.warmup_ratio, h.learning_rate);
            opt.lr = lr;
            let (loss, grads, (examples, positions)) = self.accumulated_gradients(step)?;
            opt.step(&grads)?;
            d.step = step + 1;
            let steps_run = d.step;
            ensure!(
                loss.is_finite(),
                "the loss diverged at step {steps_run} (try a lower learning_rate)"
            );
            let mut evaluated = None;
            if (steps_run == total || steps_run.is_multiple_of(eval_every)) && !self.eval.is_empty()
            {
                let (eval_loss, m) = self.evaluate()?;
                evaluated = Some(eval_loss);
                d.last_eval = Some(m);
                d.last_eval_loss = Some(eval_loss);
                if d.best.as_ref().is_none_or(|(b, _, _)| eval_loss < *b) {
                    d.best = Some((eval_loss, steps_run, self.snapshot()?));
                    d.evals_without_gain = 0;
                } else {
                    d.evals_without_gain += 1;
                }
            }
            let progress = Progress {
                step: steps_run,
                total_steps: total,
                loss,
                learning_rate: lr,
                eval: d.last_eval.clone(),
                eval_loss: evaluated,
                best_eval_loss: d.best.as_ref().map(|b| b.0),
                examples,
                positions,
            };
            if !hooks.progress(&progress) {
                bail!("cancelled at step {steps_run}");
            }
            let every = hooks.every();
            if (every > 0 && steps_run.is_multiple_of(every))
                || steps_run == total
                || stopped_early(d.evals_without_gain)
            {
                let (t, m, v) = opt.state();
                hooks.checkpoint(&Checkpoint {
                    step: steps_run,
                    params: self.snapshot()?,
                    adam_t: t,
                    adam_m: m.to_vec(),
                    adam_v: v.to_vec(),
                    best: d.best.clone(),
                    evals_without_gain: d.evals_without_gain,
                    initial_eval: d.initial_eval.clone(),
                })?;
            }
        }
        Ok(())
    }

    /// After tag training, fits the head again in closed form on the features of the
    /// trained tags, and keeps the new head only if it does better on held-out data.
    fn refit_head(&mut self) -> Result<()> {
        if !self.job.hyperparameters.head_refit || self.head.is_none() || self.eval.is_empty() {
            return Ok(());
        }
        let before = self.snapshot()?;
        let (loss_before, _) = self.evaluate()?;
        let fit = self.fit_head()?;
        let (loss_after, _) = self.evaluate()?;
        let kept = loss_after < loss_before;
        if !kept {
            self.restore(&before)?;
        }
        self.head_refit = Some(serde_json::json!({
            "fit": fit,
            "validation_loss_before": loss_before,
            "validation_loss_after": loss_after,
            "kept": kept,
        }));
        Ok(())
    }

    /// The mean loss and gradients of optimizer step `step` over its micro-batches, and
    /// the step's work: (examples, padded positions).
    fn accumulated_gradients(&self, step: usize) -> Result<(f64, Vec<Tensor>, (usize, usize))> {
        let accum = self.job.hyperparameters.grad_accum;
        let mut sums: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0;
        let (mut n_examples, mut positions) = (0, 0);
        for micro in 0..accum {
            let batch = self.batch_for(step, micro);
            let examples: Vec<&Example> = batch.iter().map(|&i| &self.train[i]).collect();
            let longest = examples.iter().map(|e| e.pieces.len()).max().unwrap_or(0);
            n_examples += examples.len();
            positions += examples.len() * longest;
            let loss = self.loss(
                &examples,
                &self.outputs(&examples, Mode::Differentiable, true)?,
            )?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let g = self.grads_of(&loss)?;
            sums = Some(match sums {
                None => g,
                Some(prev) => prev
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let grads = sums
            .context("grad_accum >= 1")?
            .into_iter()
            .map(|g| g / accum as f64)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((loss_sum / accum as f64, grads, (n_examples, positions)))
    }

    fn snapshot(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .vars()
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?)
    }

    fn restore(&mut self, snapshot: &[Tensor]) -> Result<()> {
        for (v, t) in self.vars().iter().zip(snapshot) {
            v.set(t)?;
        }
        Ok(())
    }

    /// The learned tags as bundles, with the metrics and how they were made.
    fn bundles(
        &self,
        eval: &serde_json::Value,
        best_step: usize,
        steps_run: usize,
    ) -> Result<Vec<TagBundle>> {
        let d = self.model.config().hidden_size;
        let template = Template::parse(&self.job.template);
        let head_spec = match &self.target {
            Target::Regression { mean, std } => Some(HeadSpec::Regression {
                target_mean: *mean,
                target_std: *std,
            }),
            Target::Classification { labels } => Some(HeadSpec::Classification {
                labels: labels.clone(),
            }),
            _ => None,
        };
        let frozen_tags: HashMap<String, u64> = template
            .tags()
            .iter()
            .filter(|t| !self.learned.contains_key(**t))
            .map(|t| (t.to_string(), self.frozen.get(t).map_or(0, |b| b.version())))
            .collect();
        self.learned
            .iter()
            .map(|(name, var)| {
                let version = self.frozen.get(name).map_or(1, |b| b.version() + 1);
                let is_function = self.job.stage > 1;
                let head = match (&self.head, &head_spec) {
                    (Some((w, b)), Some(spec)) => Some(Head {
                        spec: spec.clone(),
                        positions: self.head_positions(),
                        weight: w.as_tensor().copy()?,
                        bias: b.as_tensor().copy()?,
                    }),
                    _ => None,
                };
                Ok(TagBundle {
                    manifest: TagManifest {
                        name: name.clone(),
                        kind: if is_function {
                            TagKind::Function
                        } else {
                            TagKind::Domain
                        },
                        version,
                        num_vectors: var.as_tensor().dim(0)?,
                        hidden_size: d,
                        base_model: self.model.fingerprint.clone(),
                        head_positions: match head_spec {
                            Some(_) => self.head_positions(),
                            None => 1,
                        },
                        head: head_spec.clone(),
                        template: is_function.then(|| self.job.template.clone()),
                        domain_tags: template
                            .tags()
                            .iter()
                            .filter(|t| *t != name)
                            .map(|t| t.to_string())
                            .collect(),
                        tensors_sha256: None,
                        provenance: serde_json::json!({
                            "stage": self.job.stage,
                            "template": self.job.template,
                            "target": self.job.target,
                            "head": self.job.head,
                            "hyperparameters": self.job.hyperparameters,
                            "head_fit": self.head_fit,
                            "head_refit": self.head_refit,
                            "sweep": self.sweep_record,
                            "train_examples": self.train.len(),
                            "eval_examples": self.eval.len(),
                            "total_steps": self.total_steps,
                            "steps_run": steps_run,
                            "best_step": best_step,
                            "frozen_tags": frozen_tags,
                        }),
                        metrics: eval.clone(),
                    },
                    vectors: var.as_tensor().copy()?,
                    head,
                    source: "bundle",
                })
            })
            .collect()
    }
}

/// Small random head weights (the paper's start; replaced by the fit when asked), reading
/// `positions` hidden states.
fn random_head(
    model: &BaseModel,
    target: &Target,
    positions: usize,
    seed: u64,
) -> Result<Option<(Var, Var)>> {
    let k = match target {
        Target::Regression { .. } => 1,
        Target::Classification { labels } => labels.len(),
        _ => return Ok(None),
    };
    let d = positions * model.config().hidden_size;
    let mut rng = StdRng::seed_from_u64(seed);
    let w: Vec<f32> = (0..k * d)
        .map(|_| rand::Rng::random_range(&mut rng, -0.01f32..0.01))
        .collect();
    Ok(Some((
        Var::from_vec(w, (k, d), model.device())?,
        Var::zeros(k, DType::F32, model.device())?,
    )))
}
