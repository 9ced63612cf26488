//! The model-facing half of the trainer: embedding examples (learned rows from the
//! current variables), the forward pass with exact prefix reuse, outputs, losses and
//! gradients.
//!
//! Exact prefix reuse: everything before an example's first learned tag is frozen, so its
//! keys/values are computed once without gradient (fast kernels, KV cache) and only the
//! rest of the sequence is differentiated. Same gradients, a fraction of the work.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};

use super::examples::Example;
use super::job::Target;
use super::trainer::Trainer;
use crate::model::{pad_right, KvCache, Mode};
use crate::tags::compose::Piece;

pub(super) enum Outputs {
    Lm { logits: Tensor, ids: Tensor },
    Head(Tensor),
}

impl Trainer<'_> {
    /// Embeddings of `pieces`, learned rows from the current variables.
    fn embed(&self, pieces: &[Piece]) -> Result<Tensor> {
        let mut parts = Vec::new();
        let mut ids = Vec::new();
        for p in pieces {
            match p {
                Piece::Token(id) => ids.push(*id),
                Piece::TagRow { name, row, .. } => {
                    if !ids.is_empty() {
                        parts.push(self.model.llama.embed_ids(&std::mem::take(&mut ids))?);
                    }
                    let rows = match self.learned.get(name) {
                        Some(v) => v.as_tensor().narrow(0, *row, 1)?,
                        None => self
                            .frozen
                            .get(name)
                            .context("frozen tag vanished")?
                            .vectors
                            .narrow(0, *row, 1)?,
                    };
                    parts.push(rows);
                }
            }
        }
        if !ids.is_empty() {
            parts.push(self.model.llama.embed_ids(&ids)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Right-padded `[b, longest, d]` embeddings of `pieces[start_i..end_i]` and the mask.
    fn padded(&self, spans: &[&[Piece]]) -> Result<(Tensor, Tensor)> {
        let d = self.model.config().hidden_size;
        let rows = spans
            .iter()
            .map(|s| {
                if s.is_empty() {
                    Ok(Tensor::zeros((0, d), DType::F32, self.model.device())?)
                } else {
                    self.embed(s)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        pad_right(&rows)
    }

    /// Final-norm hidden states of the part of each example from its first learned tag on
    /// (`[b, s, d]`, row `i` starting at `batch[i].first_learned`). The frozen prefix runs
    /// once without gradient when `reuse_prefix`; otherwise everything is differentiated.
    pub(super) fn forward(
        &self,
        batch: &[&Example],
        mode: Mode,
        reuse_prefix: bool,
    ) -> Result<(Tensor, Vec<usize>)> {
        let llama = &self.model.llama;
        if reuse_prefix && batch.iter().any(|e| e.first_learned > 0) {
            let mut caches: HashMap<usize, Arc<KvCache>> = HashMap::new();
            let missing: Vec<&&Example> = {
                let kept = self.prefixes.lock().unwrap_or_else(PoisonError::into_inner);
                batch
                    .iter()
                    .filter(|e| match kept.get(e.id) {
                        Some(c) => {
                            caches.insert(e.id, c);
                            false
                        }
                        None => true,
                    })
                    .collect()
            };
            if !missing.is_empty() {
                let prefixes: Vec<&[Piece]> = missing
                    .iter()
                    .map(|e| &e.pieces[..e.first_learned])
                    .collect();
                let (x, m) = self.padded(&prefixes)?;
                let mut cache: KvCache = llama.new_cache();
                llama.forward(&x, Some(&m), Some(&mut cache), Mode::Fast)?;
                let mut kept = self.prefixes.lock().unwrap_or_else(PoisonError::into_inner);
                for (e, c) in missing.iter().zip(cache.split()?) {
                    kept.offer(e.id, &c)?;
                    caches.insert(e.id, Arc::new(c));
                }
            }
            let ordered: Vec<&KvCache> = batch.iter().map(|e| caches[&e.id].as_ref()).collect();
            let mut cache = KvCache::stack(&ordered, llama.config(), llama.device())?;
            let suffixes: Vec<&[Piece]> =
                batch.iter().map(|e| &e.pieces[e.first_learned..]).collect();
            let (x, m) = self.padded(&suffixes)?;
            let h = llama.forward(&x, Some(&m), Some(&mut cache), mode)?;
            Ok((h, batch.iter().map(|e| e.first_learned).collect()))
        } else {
            let full: Vec<&[Piece]> = batch.iter().map(|e| &e.pieces[..]).collect();
            let (x, m) = self.padded(&full)?;
            Ok((
                llama.forward(&x, Some(&m), None, mode)?,
                vec![0; batch.len()],
            ))
        }
    }

    /// What the model says for a batch: LM logits with their target ids, or head outputs.
    pub(super) fn outputs(
        &self,
        batch: &[&Example],
        mode: Mode,
        reuse_prefix: bool,
    ) -> Result<Outputs> {
        let (h, offsets) = self.forward(batch, mode, reuse_prefix)?;
        let (b, s, d) = h.dims3()?;
        let flat = h.reshape((b * s, d))?;
        let rows = |rows: Vec<u32>| -> Result<Tensor> {
            let idx = Tensor::from_vec(rows.clone(), rows.len(), h.device())?;
            Ok(flat.index_select(&idx, 0)?)
        };
        Ok(match &self.target {
            Target::Lm | Target::Generation => {
                let (at, ids): (Vec<u32>, Vec<u32>) = batch
                    .iter()
                    .enumerate()
                    .flat_map(|(i, e)| {
                        let (row0, off) = (i * s, offsets[i]);
                        e.lm.iter()
                            .map(move |&(p, id)| ((row0 + p - off) as u32, id))
                    })
                    .unzip();
                let n = ids.len();
                Outputs::Lm {
                    logits: self.model.llama.logits(&rows(at)?)?,
                    ids: Tensor::from_vec(ids, n, h.device())?,
                }
            }
            _ => Outputs::Head(self.head_out(&self.head_input(&h, batch, &offsets)?)?),
        })
    }

    /// Mean loss over the batch's examples (or predicted tokens).
    pub(super) fn loss(&self, batch: &[&Example], out: &Outputs) -> Result<Tensor> {
        let device = self.model.device();
        Ok(match (out, &self.target) {
            (Outputs::Lm { logits, ids }, _) => candle_nn::loss::cross_entropy(logits, ids)?,
            (Outputs::Head(o), Target::Regression { mean, std, .. }) => {
                let z: Vec<f32> = batch
                    .iter()
                    .map(|e| ((e.value - mean) / std) as f32)
                    .collect();
                (o.squeeze(1)? - Tensor::from_vec(z, batch.len(), device)?)?
                    .sqr()?
                    .mean_all()?
            }
            (Outputs::Head(o), _) => {
                let labels: Vec<u32> = batch.iter().map(|e| e.class).collect();
                candle_nn::loss::cross_entropy(o, &Tensor::from_vec(labels, batch.len(), device)?)?
            }
        })
    }

    fn head_out(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head.as_ref().context("no head")?.forward(hidden)
    }

    pub(super) fn vars(&self) -> Vec<Var> {
        let mut v: Vec<Var> = self.learned.values().cloned().collect();
        if let Some(head) = &self.head {
            v.extend(head.vars());
        }
        v
    }

    /// Every learned parameter: the tags' vectors, then the head's (output layer, then
    /// its hidden layer): the order of [`Trainer::gradients`].
    pub fn parameters(&self) -> Vec<Var> {
        self.vars()
    }

    /// The loss of `batch` (training examples by index) at the current parameters.
    pub fn batch_loss(&self, batch_idx: &[usize]) -> Result<f64> {
        Ok(self.loss_of(batch_idx, false)?.to_scalar::<f32>()? as f64)
    }

    /// The differentiable loss of `batch` (training examples by index).
    fn loss_of(&self, batch_idx: &[usize], reuse_prefix: bool) -> Result<Tensor> {
        let batch: Vec<&Example> = batch_idx.iter().map(|&i| &self.train[i]).collect();
        let out = self.outputs(&batch, Mode::Differentiable, reuse_prefix)?;
        self.loss(&batch, &out)
    }

    /// Gradients of the loss of `batch` with respect to every learned parameter, by
    /// differentiating either the whole sequence or only the part after the frozen prefix.
    pub fn gradients(&self, batch_idx: &[usize], reuse_prefix: bool) -> Result<Vec<Tensor>> {
        self.grads_of(&self.loss_of(batch_idx, reuse_prefix)?)
    }

    /// Gradients of `loss` with respect to every learned parameter, in `vars()` order.
    pub(super) fn grads_of(&self, loss: &Tensor) -> Result<Vec<Tensor>> {
        let grads = loss.backward()?;
        self.vars()
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .context("a learned parameter got no gradient")
            })
            .collect()
    }

    /// The head's input from a forward `h` (`[b, s, d]`, example `i` from `offsets[i]` on):
    /// each example's last `head_positions` hidden states up to its readout, side by side,
    /// `[b, head_positions * d]`.
    fn head_input(&self, h: &Tensor, batch: &[&Example], offsets: &[usize]) -> Result<Tensor> {
        let last = batch
            .iter()
            .zip(offsets)
            .map(|(e, off)| Ok(readout(e)? - off))
            .collect::<Result<Vec<_>>>()?;
        crate::model::rows_ending_at(h, &last, self.head_positions())
    }

    /// The head's input for each example: the final-norm hidden states at its last
    /// `head_positions` positions, concatenated, `[n, head_positions * d]` as f64 rows, in
    /// batches of `batch` with prefix reuse (which fills the prefix cache).
    pub(super) fn features(&self, examples: &[Example], batch: usize) -> Result<Vec<Vec<f64>>> {
        // Batches of similar lengths (little padding); rows go back to the examples' order.
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.sort_by_key(|&i| examples[i].pieces.len());
        let mut rows = vec![Vec::new(); examples.len()];
        for chunk in order.chunks(batch.max(1)) {
            let batch: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
            let (h, offsets) = self.forward(&batch, Mode::Fast, true)?;
            let input = self.head_input(&h, &batch, &offsets)?;
            for (&i, r) in chunk
                .iter()
                .zip(input.to_dtype(DType::F64)?.to_vec2::<f64>()?)
            {
                rows[i] = r;
            }
        }
        Ok(rows)
    }

    /// The mean loss and gradients of optimizer step `step` over its micro-batches, and
    /// the step's work: (examples, padded positions).
    pub(super) fn accumulated_gradients(
        &self,
        step: usize,
    ) -> Result<(f64, Vec<Tensor>, (usize, usize))> {
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

    pub(super) fn snapshot(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .vars()
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?)
    }

    pub(super) fn restore(&mut self, snapshot: &[Tensor]) -> Result<()> {
        for (v, t) in self.vars().iter().zip(snapshot) {
            v.set(t)?;
        }
        Ok(())
    }
}

/// Where a head example's head reads; every example of a head job has one.
fn readout(e: &Example) -> Result<usize> {
    e.readout
        .ok_or_else(|| anyhow::anyhow!("internal error: a head example without a readout"))
}
