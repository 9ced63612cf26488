//! One llama-family forward over *input embeddings*, so that tag vectors can be spliced in
//! anywhere. Two modes on the same weights:
//! - `Fast` uses candle's fused kernels (rope, softmax, rms_norm); they carry no gradient.
//! - `Differentiable` uses composite ops whose backward candle implements, so gradients
//!   reach the input embeddings (the base weights stay frozen either way).

use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops;

use super::config::LlamaConfig;
use super::kv::host_step::CpuDecode;
use super::kv::KvCache;
use super::weights::{LayerWeights, LlamaWeights};

mod slot_step;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fused kernels for serving: no gradients flow through them.
    Fast,
    /// Composite ops that candle can differentiate, for training tags.
    Differentiable,
}

/// Logits recomputed exactly on top of a quantized LM head: q8_0 moves a logit by at most
/// ~1.2 on the reference prompts, far less than the spread of the top 64.
const LOGITS_EXACT_TOP_K: usize = 64;

/// Masked attention scores get this instead of -inf, so no `inf - inf` can turn into NaN
/// in a backward pass; `exp` of it is exactly 0 in f32.
const MASKED: f32 = -1e9;

#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    w: LlamaWeights,
    /// `[max_positions, head_dim / 2]`
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// For a q8_0 serving copy on CPU: decoding steps on host slices (`kv::host_step`).
    cpu_decode: Option<Arc<CpuDecode>>,
}

/// Per-call attention geometry computed on the host from the padding mask.
struct Geometry {
    cos: Tensor,  // [b, s, hd/2]
    sin: Tensor,  // [b, s, hd/2]
    bias: Tensor, // [b, 1, s, t]
    key_valid: Vec<Vec<bool>>,
    next_pos: Vec<usize>,
}

/// The stacked q, k and v projections of `h` (`[..., d]`), biases added where the family
/// has them.
fn qkv_projection(w: &LayerWeights, h: &Tensor) -> Result<Tensor> {
    let qkv = w.qkv.forward(h)?;
    Ok(match &w.qkv_bias {
        Some(bias) => qkv.broadcast_add(bias)?,
        None => qkv,
    })
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Fast => ops::rms_norm(&x.contiguous()?, w, eps as f32)?,
        Mode::Differentiable => ops::rms_norm_slow(x, w, eps as f32)?,
    })
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// `x`: `[b, heads, s, hd]`; `cos`/`sin`: `[b, s, hd/2]` (per-sequence positions).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Fast => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?,
        Mode::Differentiable => {
            let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
            let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
            (x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?)?
        }
    })
}

fn softmax(x: &Tensor, mode: Mode) -> Result<Tensor> {
    Ok(match mode {
        Mode::Fast => ops::softmax_last_dim(&x.contiguous()?)?,
        Mode::Differentiable => ops::softmax(x, D::Minus1)?,
    })
}

impl Llama {
    pub fn new(cfg: LlamaConfig, w: LlamaWeights, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let pos = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            cfg,
            w,
            device: device.clone(),
            cpu_decode: None,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn weights(&self) -> &LlamaWeights {
        &self.w
    }

    /// The same model whose gradient-free forward reads `dtype`-quantized matrices.
    pub fn quantized(&self, dtype: candle_core::quantized::GgmlDType) -> Result<Self> {
        let w = self.w.quantized(dtype)?;
        let cpu_decode = CpuDecode::new(&self.cfg, &w, &self.cos, &self.sin)?.map(Arc::new);
        Ok(Self {
            w,
            cpu_decode,
            ..self.clone()
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers)
    }

    /// Token embeddings `[n, d]` of `ids` (no scaling: llama adds none).
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
            anyhow::bail!("token id {bad} is outside the vocabulary ({vocab})");
        }
        let ids = Tensor::new(ids, &self.device)?;
        Ok(self.w.embed.index_select(&ids, 0)?)
    }

    /// Logits over the vocabulary for final-norm hidden states `[..., d]`.
    /// With a quantized LM head (serving at q8_0), each row's best `LOGITS_EXACT_TOP_K`
    /// logits are recomputed in f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self
            .w
            .lm_head
            .forward_rescored(hidden, LOGITS_EXACT_TOP_K)?)
    }

    fn geometry(
        &self,
        b: usize,
        s: usize,
        mask: Option<&Tensor>,
        cache: Option<&KvCache>,
    ) -> Result<Geometry> {
        let new_valid: Vec<Vec<bool>> = match mask {
            Some(m) => {
                ensure!(
                    m.dims() == [b, s],
                    "mask shape {:?} does not match the input [{b}, {s}]",
                    m.dims()
                );
                m.to_dtype(DType::U32)?
                    .to_vec2::<u32>()?
                    .into_iter()
                    .map(|r| r.into_iter().map(|x| x != 0).collect())
                    .collect()
            }
            None => vec![vec![true; s]; b],
        };
        let (mut key_valid, mut next_pos) = match cache {
            Some(c) if !c.is_empty() => {
                ensure!(
                    c.key_valid.len() == b,
                    "cache holds {} sequences, input has {b}",
                    c.key_valid.len()
                );
                (c.key_valid.clone(), c.next_pos.clone())
            }
            _ => (vec![Vec::new(); b], vec![0; b]),
        };
        let past = key_valid[0].len();
        let t = past + s;
        let mut positions = Vec::with_capacity(b * s);
        let mut bias = vec![MASKED; b * s * t];
        for (bi, valid) in new_valid.iter().enumerate() {
            key_valid[bi].extend_from_slice(valid);
            for (i, &v) in valid.iter().enumerate() {
                // A pad takes the position of the token before it; nothing attends to it.
                positions.push(if v {
                    next_pos[bi]
                } else {
                    next_pos[bi].saturating_sub(1)
                } as u32);
                if v {
                    next_pos[bi] += 1;
                }
                let row = &mut bias[(bi * s + i) * t..(bi * s + i + 1) * t];
                let q = past + i;
                for (j, slot) in row.iter_mut().enumerate().take(q + 1) {
                    // Pads attend to themselves only, so their rows stay finite.
                    if key_valid[bi][j] || j == q {
                        *slot = 0.0;
                    }
                }
            }
            ensure!(
                next_pos[bi] <= self.cfg.max_position_embeddings,
                "sequence of {} positions exceeds the model's context of {}",
                next_pos[bi],
                self.cfg.max_position_embeddings
            );
        }
        let pos = Tensor::from_vec(positions, b * s, &self.device)?;
        let half = self.cfg.head_dim / 2;
        Ok(Geometry {
            cos: self.cos.index_select(&pos, 0)?.reshape((b, s, half))?,
            sin: self.sin.index_select(&pos, 0)?.reshape((b, s, half))?,
            bias: Tensor::from_vec(bias, (b, 1, s, t), &self.device)?,
            key_valid,
            next_pos,
        })
    }

    /// Runs the decoder over `embeds` `[b, s, d]` and returns the final-norm hidden states
    /// `[b, s, d]`. `mask` `[b, s]` marks real tokens (non-zero) and padding (0); padding may
    /// sit on either side. With a cache, the input continues what the cache holds and the
    /// cache is extended.
    pub fn forward(
        &self,
        embeds: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, s, d) = embeds.dims3()?;
        ensure!(
            d == self.cfg.hidden_size,
            "input embeddings have width {d}, the model {}",
            self.cfg.hidden_size
        );
        ensure!(s > 0, "empty input sequence");
        let geo = self.geometry(b, s, mask, cache.as_deref())?;
        let mut cache = cache;
        let mut x = embeds.to_dtype(DType::F32)?;
        for (li, layer) in self.w.layers.iter().enumerate() {
            let past = cache.as_ref().and_then(|c| c.layers[li].clone());
            let (out, kv) = self.block(layer, &x, &geo, past, mode)?;
            x = out;
            if let Some(c) = cache.as_deref_mut() {
                c.layers[li] = Some(kv);
            }
        }
        if let Some(c) = cache {
            c.key_valid = geo.key_valid;
            c.next_pos = geo.next_pos;
        }
        rms_norm(&x, &self.w.norm, self.cfg.rms_norm_eps, mode)
    }

    fn block(
        &self,
        w: &LayerWeights,
        x: &Tensor,
        geo: &Geometry,
        past: Option<(Tensor, Tensor)>,
        mode: Mode,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let cfg = &self.cfg;
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);

        let h = rms_norm(x, &w.attn_norm, cfg.rms_norm_eps, mode)?;
        let qkv = qkv_projection(w, &h)?;
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(D::Minus1, start * hd, n * hd)?
                .reshape((b, s, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rope(&heads(0, nh)?, &geo.cos, &geo.sin, mode)?;
        let k = rope(&heads(nh, nkv)?, &geo.cos, &geo.sin, mode)?;
        let v = heads(nh + nkv, nkv)?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        // Query heads grouped by the key/value head they share (head i reads kv head
        // i / g): one matmul per kv head over all its queries, and the cache (the long
        // side after a prefix) is never repeated g times.
        let (g, t) = (nh / nkv, k.dim(2)?);
        let grouped = q.reshape((b, nkv, g * s, hd))?;
        let scores = (grouped.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?
            .reshape((b, nkv, g, s, t))?
            .broadcast_add(&geo.bias.unsqueeze(2)?)?
            .reshape((b, nkv, g * s, t))?;
        let attn = softmax(&scores, mode)?.matmul(&v)?;
        let attn = attn
            .reshape((b, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))?;
        let kv = (k, v);
        let x = (x + w.o.forward(&attn)?)?;
        Ok((self.mlp(w, &x, mode)?, kv))
    }

    /// The feed-forward half of a block, residual included.
    fn mlp(&self, w: &LayerWeights, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let cfg = &self.cfg;
        let h = rms_norm(x, &w.ffn_norm, cfg.rms_norm_eps, mode)?;
        let gu = w.gate_up.forward(&h)?;
        let f = cfg.intermediate_size;
        let act = (gu.narrow(D::Minus1, 0, f)?.silu()? * gu.narrow(D::Minus1, f, f)?)?;
        Ok((x + w.down.forward(&act)?)?)
    }
}

/// Sequences of embeddings `[n_i, d]` right-padded with zeros into one batch
/// `[b, longest, d]` (at least one position wide), with its mask `[b, longest]` (1: real,
/// 0: padding): the layout every padded forward takes.
pub fn pad_right(rows: &[Tensor]) -> Result<(Tensor, Tensor)> {
    let first = rows
        .first()
        .ok_or_else(|| anyhow::anyhow!("nothing to pad"))?;
    let lens = rows
        .iter()
        .map(|r| r.dim(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let longest = lens.iter().copied().max().unwrap_or(0).max(1);
    let mut padded = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len() * longest);
    for (r, &n) in rows.iter().zip(&lens) {
        let (_, d) = r.dims2()?;
        padded.push(if n < longest {
            Tensor::cat(
                &[r, &Tensor::zeros((longest - n, d), r.dtype(), r.device())?],
                0,
            )?
        } else {
            r.clone()
        });
        mask.extend(std::iter::repeat_n(1u8, n).chain(std::iter::repeat_n(0u8, longest - n)));
    }
    Ok((
        Tensor::stack(&padded, 0)?,
        Tensor::from_vec(mask, (rows.len(), longest), first.device())?,
    ))
}

/// Rows of `hidden` `[b, s, d]` at one position per sequence: `[b, d]`.
pub fn rows_at(hidden: &Tensor, positions: &[usize]) -> Result<Tensor> {
    rows_ending_at(hidden, positions, 1)
}

/// Each sequence's `width` rows of `hidden` `[b, s, d]` up to and including its position in
/// `last`, side by side: `[b, width * d]` (a head reading a tag's last rows).
pub fn rows_ending_at(hidden: &Tensor, last: &[usize], width: usize) -> Result<Tensor> {
    let (b, s, d) = hidden.dims3()?;
    ensure!(
        last.len() == b,
        "{} positions for a batch of {b}",
        last.len()
    );
    ensure!(
        last.iter().all(|&p| p < s && p + 1 >= width),
        "position out of range (sequence length {s}, {width} rows each)"
    );
    let idx: Vec<u32> = last
        .iter()
        .enumerate()
        .flat_map(|(i, &p)| (i * s + p + 1 - width..=i * s + p).map(|r| r as u32))
        .collect();
    let idx = Tensor::new(idx.as_slice(), hidden.device())?;
    Ok(hidden
        .reshape((b * s, d))?
        .index_select(&idx, 0)?
        .reshape((b, width * d))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_ending_at_takes_each_sequences_last_rows_side_by_side() {
        // hidden[i][p] = [100 i + 10 p, 100 i + 10 p + 1]
        let values: Vec<f32> = (0..2)
            .flat_map(|i| (0..4).flat_map(move |p| [0, 1].map(|c| (100 * i + 10 * p + c) as f32)))
            .collect();
        let hidden = Tensor::from_vec(values, (2, 4, 2), &Device::Cpu).unwrap();
        let got = rows_ending_at(&hidden, &[2, 3], 2).unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            [[10., 11., 20., 21.], [120., 121., 130., 131.]]
        );
        let one = rows_at(&hidden, &[0, 1]).unwrap();
        assert_eq!(one.to_vec2::<f32>().unwrap(), [[0., 1.], [110., 111.]]);
        // Reading before the start, or past the end, is an error, not a wrong row.
        assert!(rows_ending_at(&hidden, &[0, 3], 2).is_err());
        assert!(rows_ending_at(&hidden, &[4, 3], 1).is_err());
    }
}
