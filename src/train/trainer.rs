//! The training run: a job checked and turned into examples (`Trainer::new`), the
//! starting point (tag initialisation, the head fit, the step-0 evaluation), and the
//! optimisation loop with evaluation, early stopping and checkpoints; the best evaluated
//! point, step 0 included, is published. The base model is frozen; only tag vectors (and
//! a function tag's head) are learned.
//!
//! Neighbours, each an `impl Trainer` of its own job: `batches` (the draw order),
//! `head_fit` (closed-form heads), `sweep`, `publish` (bundles), `forward` (the
//! model-facing half), `evaluate`; and `job` (validation), `examples` (records ->
//! examples), `init` (initialisations and fits).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::checkpoint::Checkpoint;
use super::data::Dataset;
use super::examples::{self, Example};
use super::head::HeadVars;
use super::hyperparameters::{HeadInit, TagInit};
use super::init::tag_init;
use super::job::{self, Target, TrainJob};
use super::optim::AdamW;
use super::prefix_cache::{default_budget, PrefixCache};
use super::schedule::cosine_with_warmup;
use crate::model::BaseModel;
use crate::tags::{TagBundle, TagSet};

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
    pub(super) head: Option<HeadVars>,
    pub(super) train: Vec<Example>,
    pub(super) eval: Vec<Example>,
    pub(super) eval_values: Vec<f64>,
    pub(super) total_steps: usize,
    /// Keys/values of each example's frozen prefix, kept across the run.
    pub(super) prefixes: Mutex<PrefixCache>,
    /// The draw order of the epoch last asked for: `(epoch, order)`.
    pub(super) order: Mutex<Option<(u64, Arc<Vec<usize>>)>>,
    /// How the head was fitted before step 1 (provenance).
    pub(super) head_fit: Option<serde_json::Value>,
    /// The head fitted again on the trained tags' features (provenance).
    pub(super) head_refit: Option<serde_json::Value>,
    /// The sweep that chose the learning rate and batch size, if one ran (provenance).
    pub(super) sweep_record: Option<serde_json::Value>,
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
pub(super) struct Descent {
    /// Steps taken.
    step: usize,
    /// Lowest held-out loss, its step and parameters.
    pub(super) best: Option<(f64, usize, Vec<Tensor>)>,
    evals_without_gain: usize,
    last_eval: Option<serde_json::Value>,
    pub(super) last_eval_loss: Option<f64>,
    initial_eval: Option<serde_json::Value>,
}

/// Without an eval set, training data this large gives up 10% for held-out evaluation.
const HOLD_OUT_MIN_EXAMPLES: usize = 10;

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
        let head = HeadVars::random(model, &plan.target, h.head_positions, h.head_hidden, h.seed)?;
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

    /// AdamW over the learned parameters, the head at its own rate.
    pub(super) fn optimizer(&self) -> Result<AdamW> {
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
    pub(super) fn start_point(&mut self) -> Result<Descent> {
        let start = match self.start.take() {
            Some(s) => {
                self.restore(&s.snapshot)?;
                s
            }
            None => {
                if self.job.hyperparameters.head_init == HeadInit::Fit {
                    self.head_fit = self.fit_head(true)?;
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
    pub(super) fn descend(
        &self,
        opt: &mut AdamW,
        d: &mut Descent,
        hooks: &mut dyn Hooks,
    ) -> Result<()> {
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
}
