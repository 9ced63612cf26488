//! One decoding step of every active generation over the slot cache (`kv::SlotKv`): new
//! keys and values written in place, attention read in place. A q8_0 serving copy on CPU
//! runs the step on host slices (`kv::host_step`); otherwise candle's ops do, with the
//! same block helpers as the prefill forward.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use super::{qkv_projection, rms_norm, rope, softmax, Llama, Mode, MASKED};
use crate::model::kv::attention::{self, Heads};
use crate::model::kv::SlotKv;

impl Llama {
    /// One decoding step for every active slot of `kv`: `x` `[n, 1, d]` holds each slot's
    /// next input embedding. New keys and values are written into the slots in place and
    /// attention reads the slots through views; grouped-query heads share their key/value
    /// head without copies. Returns final-norm hidden states `[n, 1, d]`. (Gradient-free.)
    /// A q8_0 serving copy on CPU computes the step on host slices (`kv::host_step`) when its
    /// kernel serves `n` sequences; otherwise candle's ops do.
    pub fn decode_slots(&self, x: &Tensor, kv: &mut SlotKv) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (n, s, d) = x.dims3()?;
        ensure!(
            n == kv.len() && s == 1 && d == cfg.hidden_size,
            "decode_slots takes [{}, 1, {}], got {:?}",
            kv.len(),
            cfg.hidden_size,
            x.dims()
        );
        let lens = kv.lens().to_vec();
        let t = lens.iter().max().map_or(0, |m| m + 1);
        ensure!(
            t <= cfg.max_position_embeddings,
            "sequence of {t} positions exceeds the model's context of {}",
            cfg.max_position_embeddings
        );
        kv.reserve(n, t)?;
        if let Some(fast) = (self.cpu_decode.as_deref()).filter(|c| c.serves(n)) {
            let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let hidden = fast.step(cfg, &self.w, xs, kv)?;
            kv.advance();
            return Ok(Tensor::from_vec(hidden, (n, 1, d), &self.device)?);
        }
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let positions: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        let pos = Tensor::from_vec(positions, n, &self.device)?;
        let (cos, sin) = (
            self.cos.index_select(&pos, 0)?.unsqueeze(1)?,
            self.sin.index_select(&pos, 0)?.unsqueeze(1)?,
        );
        // Slot i attends to its positions 0..=lens[i]. On CPU it reads just those; through
        // candle's matmuls the rest of the view is masked (slots all of one length, always
        // so for one, need no mask: one op less a layer).
        let attending: Vec<usize> = lens.iter().map(|l| l + 1).collect();
        let bias = if self.device.is_cpu() || lens.iter().all(|&l| l + 1 == t) {
            None
        } else {
            let mut bias = vec![MASKED; n * t];
            for (i, &l) in lens.iter().enumerate() {
                bias[i * t..i * t + l + 1].fill(0.0);
            }
            Some(Tensor::from_vec(bias, (n, 1, 1, t), &self.device)?)
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = x.to_dtype(DType::F32)?;
        for (li, w) in self.w.layers.iter().enumerate() {
            let h = rms_norm(&x, &w.attn_norm, cfg.rms_norm_eps, Mode::Fast)?;
            let qkv = qkv_projection(w, &h)?.reshape((n, nh + 2 * nkv, hd))?;
            let heads = |start: usize, count: usize| -> Result<Tensor> {
                Ok(qkv.narrow(1, start, count)?.unsqueeze(2)?.contiguous()?)
            };
            let q = rope(&heads(0, nh)?, &cos, &sin, Mode::Fast)?;
            let k = rope(&heads(nh, nkv)?, &cos, &sin, Mode::Fast)?;
            kv.write(li, &k, &heads(nh + nkv, nkv)?)?;
            let attn = if self.device.is_cpu() {
                let q = q.flatten_all()?.to_vec1::<f32>()?;
                let shape = Heads {
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: hd,
                };
                let out = kv.with_cpu_layer(li, |cache| {
                    attention::attend(&q, cache, &attending, shape, scale as f32)
                })?;
                Tensor::from_vec(out, (n, 1, nh * hd), &self.device)?
            } else {
                let (keys, values) = kv.view(li, t)?;
                // [n, nh, 1, hd] as [n, nkv, group, hd]: a group's query heads share a kv
                // head.
                let q = q.reshape((n, nkv, nh / nkv, hd))?;
                let mut scores = (q.matmul(&keys.t()?)? * scale)?;
                if let Some(bias) = &bias {
                    scores = scores.broadcast_add(bias)?;
                }
                let attn = softmax(&scores, Mode::Fast)?.matmul(&values)?;
                attn.reshape((n, 1, nh * hd))?
            };
            let x1 = (&x + w.o.forward(&attn)?)?;
            x = self.mlp(w, &x1, Mode::Fast)?;
        }
        kv.advance();
        rms_norm(&x, &self.w.norm, cfg.rms_norm_eps, Mode::Fast)
    }
}
