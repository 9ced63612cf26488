//! The head fitted in closed form on the features at the function tag: before step 1
//! (ridge or logistic regression, the penalty chosen on held-out data) and again on the
//! trained tags' features when that helps.

use anyhow::{bail, Result};

use super::evaluate::EVAL_BATCH;
use super::examples::Example;
use super::init::{fit_logistic, fit_ridge};
use super::job::Target;
use super::trainer::Trainer;

impl Trainer<'_> {
    /// The head's inputs on the training set (final-norm hidden states at the function
    /// tag's readout, with the current tag vectors) and the standardised regression
    /// targets: what the closed-form head fit sees, e.g. for a linear probe.
    pub fn head_features(&self) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
        let Target::Regression { mean, std, .. } = &self.target else {
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
    pub(super) fn fit_head(&mut self, fresh_hidden: bool) -> Result<Option<serde_json::Value>> {
        let Some(head) = self.head.as_ref() else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let x = self.features(&self.train, EVAL_BATCH)?;
        let xv = self.features(&self.eval, EVAL_BATCH)?;
        let features_seconds = started.elapsed().as_secs_f64();
        // An MLP head: its hidden layer scaled to these features before the first fit (a
        // refit keeps the trained one); the output layer is then solved on its activations.
        if fresh_hidden {
            head.fit_hidden_to(&x)?;
        }
        let (x, xv) = (head.output_inputs(&x)?, head.output_inputs(&xv)?);
        let fit = match &self.target {
            Target::Regression { mean, std, .. } => {
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
        let (w, b) = &head.out;
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

    /// After tag training, fits the head again in closed form on the features of the
    /// trained tags, and keeps the new head only if it does better on held-out data.
    pub(super) fn refit_head(&mut self) -> Result<()> {
        if !self.job.hyperparameters.head_refit || self.head.is_none() || self.eval.is_empty() {
            return Ok(());
        }
        let before = self.snapshot()?;
        let (loss_before, _) = self.evaluate()?;
        let fit = self.fit_head(false)?;
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
}
