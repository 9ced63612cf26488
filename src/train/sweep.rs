//! A learning-rate × batch-size sweep: short runs from one shared start, then the job
//! trains with the best pair.

use std::sync::PoisonError;

use anyhow::{ensure, Context, Result};

use super::hyperparameters::Hyperparameters;
use super::trainer::{Progress, Trainer};

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

impl Trainer<'_> {
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
    fn set_hyperparameters(&mut self, h: Hyperparameters) {
        self.total_steps = h.total_steps(self.train.len());
        self.job.hyperparameters = h;
        *self.order.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}
