//! The draw order of training examples: seeded, bucketed by length (little padding),
//! and a pure function of the step, so a resumed run sees the batches an uninterrupted
//! one would.

use std::sync::{Arc, PoisonError};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::trainer::Trainer;

/// Batches are formed within windows of this many batches, sorted by length, so that a
/// batch's examples have similar lengths (little padding) while the order stays random.
const BUCKET_WINDOW_BATCHES: usize = 50;

impl Trainer<'_> {
    /// Optimizer steps in one pass over the training examples.
    pub(super) fn steps_per_epoch(&self) -> usize {
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
    pub(super) fn batch_for(&self, step: usize, micro: usize) -> Vec<usize> {
        let h = &self.job.hyperparameters;
        let n = self.train.len();
        let first = (step * h.grad_accum + micro) * h.batch_size;
        (first..first + h.batch_size)
            .map(|draw| self.epoch_order((draw / n) as u64)[draw % n])
            .collect()
    }
}
