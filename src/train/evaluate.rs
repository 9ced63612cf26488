//! Held-out evaluation: the loss and the metrics that fit the task.

use anyhow::Result;
use candle_core::D;

use super::examples::Example;
use super::forward::Outputs;
use super::job::Target;
use super::metrics;
use super::trainer::Trainer;
use crate::model::Mode;
use crate::tags::regression_value;

/// Evaluation needs no gradient, so its batch is sized for throughput, not the job's.
pub(super) const EVAL_BATCH: usize = 16;

impl Trainer<'_> {
    /// Held-out evaluation: the loss and the metrics that fit the task.
    pub fn evaluate(&self) -> Result<(f64, serde_json::Value)> {
        if self.eval.is_empty() {
            return Ok((f64::NAN, serde_json::Value::Null));
        }
        let mut total = 0.0;
        let mut preds = Vec::new();
        let mut correct = 0usize;
        for chunk in self.eval.chunks(EVAL_BATCH) {
            let batch: Vec<&Example> = chunk.iter().collect();
            let out = self.outputs(&batch, Mode::Fast, true)?;
            total += self.loss(&batch, &out)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            match (&out, &self.target) {
                (Outputs::Head(o), Target::Regression { mean, std, range }) => {
                    // As served: in the target's units, within its range.
                    preds.extend(
                        o.flatten_all()?
                            .to_vec1::<f32>()?
                            .iter()
                            .map(|z| regression_value(*z as f64, *mean, *std, *range)),
                    );
                }
                (Outputs::Head(o), _) => {
                    let best: Vec<u32> = o.argmax(D::Minus1)?.to_vec1()?;
                    correct += best
                        .iter()
                        .zip(chunk)
                        .filter(|(p, e)| **p == e.class)
                        .count();
                }
                _ => {}
            }
        }
        let loss = total / self.eval.len() as f64;
        let n = self.eval.len();
        let mut m = match &self.target {
            Target::Regression { .. } => {
                serde_json::to_value(metrics::regression(&preds, &self.eval_values))?
            }
            Target::Classification { .. } => {
                serde_json::json!({"accuracy": correct as f64 / n as f64, "n": n})
            }
            Target::Lm | Target::Generation => {
                serde_json::json!({"perplexity": loss.exp(), "n": n})
            }
        };
        m["loss"] = serde_json::json!(loss);
        Ok((loss, m))
    }
}
