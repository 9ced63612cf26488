//! Reading a prediction off the final-norm hidden state at a function tag.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;

use crate::model::FinishReason;
use crate::tags::{Head, HeadSpec};

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Prediction {
    /// Regression head: the value in the target's original units.
    Value { value: f64 },
    /// Classification head: the most likely label and every label's probability.
    Class {
        label: String,
        scores: BTreeMap<String, f64>,
    },
    /// No head: generated text.
    Text {
        text: String,
        ids: Vec<u32>,
        #[schema(value_type = String)]
        finish_reason: FinishReason,
    },
}

/// Applies `head` to hidden states `[n, d]`, one prediction per row.
pub fn apply_head(head: &Head, hidden: &Tensor) -> Result<Vec<Prediction>> {
    let out = hidden
        .matmul(&head.weight.t()?)?
        .broadcast_add(&head.bias)?;
    let rows: Vec<Vec<f32>> = out.to_vec2()?;
    Ok(rows
        .into_iter()
        .map(|r| match &head.spec {
            HeadSpec::Regression {
                target_mean,
                target_std,
            } => Prediction::Value {
                value: r[0] as f64 * target_std + target_mean,
            },
            HeadSpec::Classification { labels } => {
                let max = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f64> = r.iter().map(|x| ((x - max) as f64).exp()).collect();
                let sum: f64 = exp.iter().sum();
                let best = (0..r.len())
                    .max_by(|&a, &b| r[a].total_cmp(&r[b]))
                    .unwrap_or(0);
                Prediction::Class {
                    label: labels[best].clone(),
                    scores: labels
                        .iter()
                        .cloned()
                        .zip(exp.iter().map(|e| e / sum))
                        .collect(),
                }
            }
        })
        .collect())
}
