//! A decoding step on the CPU from q8_0 weights, computed on plain slices.
//!
//! Through candle, a step's layer was ~25 ops on tiny tensors (norms, narrows and the copies
//! they force, rope, SiLU, products, sums, a tensor per op), each allocating and dispatching
//! to the pool: at 16 sequences, about two thirds of a q8_0 step besides the matmuls. Here
//! a layer is: norm, the q/k/v matmul, rope in place, keys and values written into the
//! slot cache, attention (`attention`), the output matmul and residual, norm, the
//! gate/up matmul, SwiGLU in one vectorised pass, the down matmul and residual. The
//! arithmetic is the same as candle's ops, up to the order of f32 sums and `vec_math::exp`.

use anyhow::{ensure, Context, Result};

use super::attention::{self, Heads};
use super::slots::SlotKv;
use crate::model::config::LlamaConfig;
use crate::model::q8_matvec::Q8Matrix;
use crate::model::vec_math;
use crate::model::weights::LlamaWeights;

/// What a step reads besides the q8_0 matrices, as host vectors (made once, when the
/// serving copy is quantized).
#[derive(Debug)]
pub(crate) struct CpuDecode {
    /// Per layer: the attention and feed-forward norms' weights.
    norms: Vec<(Vec<f32>, Vec<f32>)>,
    /// Per layer: the q/k/v biases, for families that have them.
    qkv_biases: Vec<Option<Vec<f32>>>,
    final_norm: Vec<f32>,
    /// `[max_positions, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// One layer's q8_0 matrices.
struct LayerMatrices<'a> {
    qkv: &'a Q8Matrix,
    o: &'a Q8Matrix,
    gate_up: &'a Q8Matrix,
    down: &'a Q8Matrix,
}

impl CpuDecode {
    /// For weights whose every block matrix has a q8_0 copy on the CPU; `None` otherwise.
    pub(crate) fn new(
        cfg: &LlamaConfig,
        w: &LlamaWeights,
        cos: &candle_core::Tensor,
        sin: &candle_core::Tensor,
    ) -> Result<Option<Self>> {
        if !cos.device().is_cpu() || layer_matrices(w).is_none() {
            return Ok(None);
        }
        let host = |t: &candle_core::Tensor| -> Result<Vec<f32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let norms = (w.layers.iter())
            .map(|l| Ok((host(&l.attn_norm)?, host(&l.ffn_norm)?)))
            .collect::<Result<_>>()?;
        let qkv_biases = (w.layers.iter())
            .map(|l| l.qkv_bias.as_ref().map(host).transpose())
            .collect::<Result<_>>()?;
        let this = Self {
            norms,
            qkv_biases,
            final_norm: host(&w.norm)?,
            cos: host(cos)?,
            sin: host(sin)?,
        };
        ensure!(
            this.cos.len() == cfg.max_position_embeddings * cfg.head_dim / 2,
            "rope tables of {} values for {} positions",
            this.cos.len(),
            cfg.max_position_embeddings
        );
        Ok(Some(this))
    }

    /// Whether a step of `n` sequences is served here: the q8_0 kernel serves that many.
    pub(crate) fn serves(&self, n: usize) -> bool {
        n <= Q8Matrix::DECODE_MAX_ROWS
    }

    /// One decoding step: `x` holds each active slot's input embedding (`[n, d]`, end to
    /// end). Writes the new keys and values into `kv` (the caller has reserved room and
    /// advances it) and returns the final-norm hidden states, `[n, d]`.
    pub(crate) fn step(
        &self,
        cfg: &LlamaConfig,
        w: &LlamaWeights,
        mut x: Vec<f32>,
        kv: &SlotKv,
    ) -> Result<Vec<f32>> {
        let layers = layer_matrices(w).context("the weights have no q8_0 copy")?;
        let (nh, nkv, hd, d) = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.hidden_size,
        );
        let n = kv.len();
        ensure!(
            x.len() == n * d,
            "a step of {n} slots takes {} values",
            n * d
        );
        let eps = cfg.rms_norm_eps as f32;
        let lens = kv.lens();
        // Slot i attends to its positions 0..=lens[i].
        let attending: Vec<usize> = lens.iter().map(|l| l + 1).collect();
        let shape = Heads {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let width = (nh + 2 * nkv) * hd;
        let f = cfg.intermediate_size;
        let mut h = vec![0f32; n * d];
        let mut q = vec![0f32; n * nh * hd];
        let mut act = vec![0f32; n * f];
        for (li, (m, (attn_norm, ffn_norm))) in layers.iter().zip(&self.norms).enumerate() {
            rms_norm_rows(&x, attn_norm, eps, &mut h);
            let mut qkv = m.qkv.forward_rows(&h);
            if let Some(bias) = &self.qkv_biases[li] {
                for row in qkv.chunks_exact_mut(width) {
                    add_into(row, bias);
                }
            }
            for (row, &pos) in qkv.chunks_exact_mut(width).zip(lens) {
                // Queries' and keys' heads (values are not rotated).
                self.rope(&mut row[..(nh + nkv) * hd], pos, hd);
            }
            kv.write_rows(li, &qkv, width, nh * hd, (nh + nkv) * hd)?;
            for (q, row) in q.chunks_exact_mut(nh * hd).zip(qkv.chunks_exact(width)) {
                q.copy_from_slice(&row[..nh * hd]);
            }
            let attn = kv.with_cpu_layer(li, |cache| {
                attention::attend(&q, cache, &attending, shape, scale)
            })?;
            add_into(&mut x, &m.o.forward_rows(&attn));
            rms_norm_rows(&x, ffn_norm, eps, &mut h);
            let gu = m.gate_up.forward_rows(&h);
            for (gu, act) in gu.chunks_exact(2 * f).zip(act.chunks_exact_mut(f)) {
                let (gate, up) = gu.split_at(f);
                vec_math::swiglu(gate, up, act);
            }
            add_into(&mut x, &m.down.forward_rows(&act));
        }
        rms_norm_rows(&x, &self.final_norm, eps, &mut h);
        Ok(h)
    }

    /// Rotates each head of `heads` (`head_dim` values each) to position `pos`, halves
    /// rotated together (HF's `rotate_half` layout, as candle's `rope`).
    fn rope(&self, heads: &mut [f32], pos: usize, hd: usize) {
        let half = hd / 2;
        let (cos, sin) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        for head in heads.chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for (((a, b), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                let (x1, x2) = (*a, *b);
                *a = x1 * c - x2 * s;
                *b = x1 * s + x2 * c;
            }
        }
    }
}

/// Every layer's q8_0 matrices, if each has them.
fn layer_matrices(w: &LlamaWeights) -> Option<Vec<LayerMatrices<'_>>> {
    (w.layers.iter())
        .map(|l| {
            Some(LayerMatrices {
                qkv: l.qkv.q8()?,
                o: l.o.q8()?,
                gate_up: l.gate_up.q8()?,
                down: l.down.q8()?,
            })
        })
        .collect()
}

/// RMS norm of each row of `x` (rows of `weight.len()` values) into `out`, as candle's
/// `rms_norm`: `x / sqrt(mean(x²) + eps) * weight`.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (row, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / d as f32 + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
            *o = v / m * w;
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (x, &y) in x.iter_mut().zip(y) {
        *x += y;
    }
}
