//! Head predictions: the forwards that compute them (padded batches, or a shared prefix
//! once and then every suffix) and reading a prediction off the final-norm hidden state at
//! a function tag.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;

use crate::model::{pad_right, BaseModel, FinishReason, Mode};
use crate::tags::compose::Composed;
use crate::tags::{regression_value, Head, HeadSpec};

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

/// Applies `head` to its inputs `[n, positions * d]` (each row the hidden states it reads,
/// concatenated), one prediction per row.
pub fn apply_head(head: &Head, hidden: &Tensor) -> Result<Vec<Prediction>> {
    let out = head.forward(hidden)?;
    let rows: Vec<Vec<f32>> = out.to_vec2()?;
    Ok(rows
        .into_iter()
        .map(|r| match &head.spec {
            HeadSpec::Regression {
                target_mean,
                target_std,
                range,
            } => Prediction::Value {
                value: regression_value(r[0] as f64, *target_mean, *target_std, *range),
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

/// Right-pads `seqs` into one forward and applies each one's head at its readout
/// (every sequence must have a head).
pub fn padded_heads(model: &BaseModel, seqs: &[&Composed]) -> Result<Vec<Prediction>> {
    let (rows, mask) = embed_padded(model, seqs, 0)?;
    let hidden = model.llama.forward(&rows, Some(&mask), None, Mode::Fast)?;
    read_heads(seqs, &hidden, 0)
}

/// The final hidden states at each sequence's last `positions` positions, concatenated
/// in order (the features a linear probe on the frozen model reads), as one padded batch.
pub fn padded_last_hidden(
    model: &BaseModel,
    seqs: &[&Composed],
    positions: usize,
) -> Result<Vec<Vec<f32>>> {
    let (rows, mask) = embed_padded(model, seqs, 0)?;
    let hidden = model.llama.forward(&rows, Some(&mask), None, Mode::Fast)?;
    seqs.iter()
        .enumerate()
        .map(|(i, s)| {
            let first = s.len().checked_sub(positions).ok_or_else(|| {
                anyhow::anyhow!(
                    "a sequence of {} positions has no last {positions}",
                    s.len()
                )
            })?;
            Ok(side_by_side(&hidden, i, first..s.len())?.to_vec1::<f32>()?)
        })
        .collect()
}

/// The common prefix (its first `shared` positions) once, at batch 1 and cached, then
/// every suffix in one padded batch.
pub(super) fn shared_prefix_heads(
    model: &BaseModel,
    seqs: &[&Composed],
    shared: usize,
) -> Result<Vec<Prediction>> {
    let prefix = seqs[0]
        .embed(model, 0)?
        .narrow(0, 0, shared)?
        .unsqueeze(0)?;
    let mut cache = model.llama.new_cache();
    model
        .llama
        .forward(&prefix, None, Some(&mut cache), Mode::Fast)?;
    let mut cache = cache.repeat(seqs.len())?;
    let (rows, mask) = embed_padded(model, seqs, shared)?;
    let hidden = model
        .llama
        .forward(&rows, Some(&mask), Some(&mut cache), Mode::Fast)?;
    read_heads(seqs, &hidden, shared)
}

/// Each sequence's embeddings from position `start` on, right-padded into one batch.
fn embed_padded(model: &BaseModel, seqs: &[&Composed], start: usize) -> Result<(Tensor, Tensor)> {
    let rows = seqs
        .iter()
        .map(|s| s.embed(model, start))
        .collect::<Result<Vec<_>>>()?;
    pad_right(&rows)
}

fn no_head() -> anyhow::Error {
    anyhow::anyhow!("internal error: a sequence sent to the heads has no head")
}

/// Each sequence's head applied to the hidden states it reads (`hidden` is `[b, s, d]`,
/// row `i` holding sequence `i` from position `start` on).
fn read_heads(seqs: &[&Composed], hidden: &Tensor, start: usize) -> Result<Vec<Prediction>> {
    seqs.iter()
        .enumerate()
        .map(|(i, s)| {
            let (head, reads) = s.head().zip(s.head_reads()).ok_or_else(no_head)?;
            anyhow::ensure!(
                reads.start >= start,
                "internal error: the head reads inside the shared prefix"
            );
            let input = side_by_side(hidden, i, reads.start - start..reads.end - start)?;
            Ok(apply_head(head, &input.unsqueeze(0)?)?.remove(0))
        })
        .collect()
}

/// Row `i`'s hidden states at `positions` of a `[b, s, d]` forward, side by side: `[n * d]`.
fn side_by_side(hidden: &Tensor, i: usize, positions: std::ops::Range<usize>) -> Result<Tensor> {
    Ok(hidden
        .get(i)?
        .narrow(0, positions.start, positions.len())?
        .flatten_all()?)
}
