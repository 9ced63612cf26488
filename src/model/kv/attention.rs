//! Attention of a decoding step on CPU: each slot's one new query against exactly its own
//! cached positions, read in place from the slot cache.
//!
//! Through candle this was, per layer, a batched matmul of `slots × kv_heads` tiny products
//! (a gemm call each), a scale, a mask for slots shorter than the longest, a softmax and a
//! second batched matmul: a fifth of a 16-sequence q8_0 step, mostly per-call overhead.
//! Here one (slot, kv head) pair is one work item of candle's pool, and a slot reads only
//! its own positions, so there is nothing to mask; a slot's result does not depend on the
//! others.

use super::slots::CachedLayer;
use crate::model::disjoint::DisjointOut;
use crate::model::vec_math;

/// The attention heads' shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `q`: the new queries, `[n, heads, head_dim]` (after rope); `lens[i]`: the positions slot
/// `i` attends to, the new one included. Returns `softmax(q k^T * scale) v` per head,
/// `[n, heads * head_dim]`.
pub(crate) fn attend(
    q: &[f32],
    cache: &CachedLayer,
    lens: &[usize],
    shape: Heads,
    scale: f32,
) -> Vec<f32> {
    let step = Step {
        q,
        cache,
        lens,
        shape,
        scale,
    };
    let mut out = vec![0f32; q.len()];
    let writer = DisjointOut::new(&mut out);
    let items = lens.len() * shape.kv_heads;
    candle_core::utils::barrier_pool().execute_chunked(items, |range| {
        for item in range {
            // SAFETY: an item writes only its own slot's heads of its kv head, inside
            // `out`, which outlives the pool's call.
            unsafe { attend_item(&step, item, writer) }
        }
    });
    out
}

/// One layer's attention inputs (see [`attend`]).
struct Step<'a> {
    q: &'a [f32],
    cache: &'a CachedLayer<'a>,
    lens: &'a [usize],
    shape: Heads,
    scale: f32,
}

/// One (slot, kv head) pair: each query head of its group over the slot's positions.
///
/// # Safety
/// `out` holds `q.len()` values; no other thread writes this item's heads.
unsafe fn attend_item(step: &Step, item: usize, out: DisjointOut) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature; the caller vouches for `out`.
            return unsafe { attend_item_avx512(step, item, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return unsafe { attend_item_avx2(step, item, out) };
        }
    }
    unsafe { attend_item_any(step, item, out, dot, weighted_sum) }
}

/// `attend_item_any` compiled for AVX-512, with a dot product in one register (LLVM
/// vectorised the portable `dot` only two lanes wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_item_avx512(step: &Step, item: usize, out: DisjointOut) {
    let dot = |a: &[f32], b: &[f32]| dot_avx512(a, b);
    let weighted_sum = |w: &[f32], v: &[f32], out: &mut [f32]| weighted_sum_avx512(w, v, out);
    unsafe { attend_item_any(step, item, out, dot, weighted_sum) }
}

/// `weighted_sum` with the outputs summed in AVX-512 registers over the positions, four
/// registers (64 outputs) at a time: four independent chains of FMAs, where one register
/// at a time waited on its own previous FMA at every position (the portable loop re-reads
/// and re-writes the outputs at every position).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn weighted_sum_avx512(weights: &[f32], values: &[f32], out: &mut [f32]) {
    const LANES: usize = 16;
    const REGS: usize = 4;
    let hd = out.len();
    let whole = hd - hd % LANES;
    for (c, out) in out[..whole].chunks_mut(LANES * REGS).enumerate() {
        let from = c * LANES * REGS;
        match out.len() / LANES {
            4 => weighted_sum_regs_avx512::<4>(weights, values, hd, from, out),
            3 => weighted_sum_regs_avx512::<3>(weights, values, hd, from, out),
            2 => weighted_sum_regs_avx512::<2>(weights, values, hd, from, out),
            _ => weighted_sum_regs_avx512::<1>(weights, values, hd, from, out),
        }
    }
    for (j, o) in out.iter_mut().enumerate().skip(whole) {
        *o = weights
            .iter()
            .zip(values.chunks_exact(hd))
            .map(|(w, v)| w * v[j])
            .sum();
    }
}

/// `out` (`R` × 16 values) = Σ_p weights[p] · values[p][from..] (each position `hd`
/// values), in `R` registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn weighted_sum_regs_avx512<const R: usize>(
    weights: &[f32],
    values: &[f32],
    hd: usize,
    from: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); R];
    for (&w, value) in weights.iter().zip(values.chunks_exact(hd)) {
        let w = _mm512_set1_ps(w);
        let v = &value[from..from + R * 16];
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: `v` holds R × 16 values.
            let x = unsafe { _mm512_loadu_ps(v.as_ptr().add(r * 16)) };
            *acc = _mm512_fmadd_ps(w, x, *acc);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: `out` holds R × 16 values.
        unsafe { _mm512_storeu_ps(out[r * 16..].as_mut_ptr(), *acc) };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (whole_a, whole_b) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = (whole_a.remainder().iter())
        .zip(whole_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = _mm512_setzero_ps();
    for (x, y) in whole_a.zip(whole_b) {
        // SAFETY: both chunks hold 16 values.
        let (x, y) = unsafe { (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(y.as_ptr())) };
        acc = _mm512_fmadd_ps(x, y, acc);
    }
    _mm512_reduce_add_ps(acc) + tail
}

/// `attend_item_any` compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_item_avx2(step: &Step, item: usize, out: DisjointOut) {
    unsafe { attend_item_any(step, item, out, dot, weighted_sum) }
}

#[inline(always)]
unsafe fn attend_item_any(
    step: &Step,
    item: usize,
    out: DisjointOut,
    dot: impl Fn(&[f32], &[f32]) -> f32,
    weighted_sum: impl Fn(&[f32], &[f32], &mut [f32]),
) {
    let Step {
        q,
        cache,
        lens,
        shape,
        scale,
    } = *step;
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let (slot, kv) = (item / kv_heads, item % kv_heads);
    let len = lens[slot];
    let start = (slot * kv_heads + kv) * cache.capacity * hd;
    let keys = &cache.keys[start..start + len * hd];
    let values = &cache.values[start..start + len * hd];
    let group = heads / kv_heads;
    let mut weights = vec![0f32; len];
    let mut head = vec![0f32; hd];
    for h in kv * group..(kv + 1) * group {
        let at = (slot * heads + h) * hd;
        let query = &q[at..at + hd];
        for (w, key) in weights.iter_mut().zip(keys.chunks_exact(hd)) {
            *w = dot(query, key) * scale;
        }
        let max = weights.iter().fold(f32::NEG_INFINITY, |m, &w| m.max(w));
        // Exponentials in their own loop, which vectorises (the sum's order would not).
        for w in weights.iter_mut() {
            *w = vec_math::exp(*w - max);
        }
        let sum: f32 = weights.iter().sum();
        for w in weights.iter_mut() {
            *w /= sum;
        }
        weighted_sum(&weights, values, &mut head);
        for (j, &o) in head.iter().enumerate() {
            // SAFETY: `at + j` is this slot's head `h`, one of this item's.
            unsafe { out.write(at + j, o) };
        }
    }
}

/// `out = Σ_p weights[p] · values[p]` over positions `p` (`values`: `[positions, out.len()]`).
#[inline(always)]
fn weighted_sum(weights: &[f32], values: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    for (&w, value) in weights.iter().zip(values.chunks_exact(out.len())) {
        for (o, &v) in out.iter_mut().zip(value) {
            *o += w * v;
        }
    }
}

/// A dot product in 16 partial sums, so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (whole_a, whole_b) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = (whole_a.remainder().iter())
        .zip(whole_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in whole_a.zip(whole_b) {
        // Zipped, not indexed: without bounds checks the 16 lanes become one vector.
        for ((lane, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    // Halves added pairwise (a tree, in vector registers), not one lane after another.
    let mut width = 8;
    while width > 0 {
        for j in 0..width {
            lanes[j] += lanes[j + width];
        }
        width /= 2;
    }
    lanes[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q·k * scale) · v for one head, in f64, the obvious way.
    fn reference(q: &[f32], keys: &[&[f32]], values: &[&[f32]], scale: f32) -> Vec<f64> {
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(*k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        (0..q.len())
            .map(|j| {
                exps.iter()
                    .zip(values)
                    .map(|(e, v)| e / sum * v[j] as f64)
                    .sum()
            })
            .collect()
    }

    #[test]
    fn each_slot_attends_over_its_own_positions_with_grouped_heads() {
        // 3 slots of different lengths, 6 query heads over 2 kv heads, a head size with a
        // tail past the 16-wide chunks, and spare capacity that must not be read.
        let shape = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: 20,
        };
        let (slots, capacity, hd) = (3, 7, 20);
        let value = |i: usize| ((i * 7_919 % 1_000) as f32 / 500.0) - 1.0;
        let cache_len = slots * shape.kv_heads * capacity * hd;
        let keys: Vec<f32> = (0..cache_len).map(value).collect();
        let values: Vec<f32> = (0..cache_len).map(|i| value(i + 13)).collect();
        let q: Vec<f32> = (0..slots * shape.heads * hd)
            .map(|i| value(i + 101))
            .collect();
        let lens = [1, 7, 4];
        let cache = CachedLayer {
            keys: &keys,
            values: &values,
            capacity,
        };
        let got = attend(&q, &cache, &lens, shape, 0.3);
        for (slot, &len) in lens.iter().enumerate() {
            for h in 0..shape.heads {
                let kv = h / (shape.heads / shape.kv_heads);
                let rows = |data: &'_ [f32]| -> Vec<Vec<f32>> {
                    (0..len)
                        .map(|p| {
                            let at = ((slot * shape.kv_heads + kv) * capacity + p) * hd;
                            data[at..at + hd].to_vec()
                        })
                        .collect()
                };
                let (k, v) = (rows(&keys), rows(&values));
                let k: Vec<&[f32]> = k.iter().map(|r| r.as_slice()).collect();
                let v: Vec<&[f32]> = v.iter().map(|r| r.as_slice()).collect();
                let at = (slot * shape.heads + h) * hd;
                let want = reference(&q[at..at + hd], &k, &v, 0.3);
                for (g, w) in got[at..at + hd].iter().zip(want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5,
                        "slot {slot} head {h}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
