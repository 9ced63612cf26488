//! The frozen weights of a llama-family decoder, in the layout the forward uses: HF layout
//! (q/k rows for `rotate_half` RoPE), float32, with q/k/v and gate/up fused into one
//! matrix each so that every block runs two input matmuls instead of five (and q/k/v's
//! biases, where the family has them, fused the same way).

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::linear::FrozenLinear;

#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    /// `[q + 2 kv, d]`: q, k and v projections stacked.
    pub qkv: FrozenLinear,
    /// `[q + 2 kv]`: their biases, stacked the same way (qwen2).
    pub qkv_bias: Option<Tensor>,
    pub o: FrozenLinear,
    pub ffn_norm: Tensor,
    /// `[2 ffn, d]`: gate and up projections stacked.
    pub gate_up: FrozenLinear,
    pub down: FrozenLinear,
}

#[derive(Debug, Clone)]
pub struct LlamaWeights {
    /// `[vocab, d]` token embeddings.
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// The LM head; the embedding matrix itself when the model ties them.
    pub lm_head: FrozenLinear,
}

/// One block's tensors in HF layout, before fusing, as a loader finds them.
pub struct RawLayer {
    pub attn_norm: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub ffn_norm: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    /// The q, k and v biases, for families that have them (qwen2).
    pub qkv_bias: Option<[Tensor; 3]>,
}

fn f32_on(t: Tensor, device: &Device) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?)
}

fn expect_shape(name: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    ensure!(
        t.dims() == dims,
        "tensor {name} has shape {:?}, the config implies {:?}",
        t.dims(),
        dims
    );
    Ok(())
}

impl LlamaWeights {
    /// A copy whose matrices (blocks and LM head) also carry a `dtype` quantization for
    /// gradient-free inputs; embeddings and norms stay f32. The LM head's best logits are
    /// recomputed in f32 (`Llama::logits`): a quantized head alone changed the
    /// reference's greedy answer (tests/reference_model.rs).
    pub fn quantized(&self, dtype: candle_core::quantized::GgmlDType) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    qkv: l.qkv.quantized(dtype)?,
                    o: l.o.quantized(dtype)?,
                    gate_up: l.gate_up.quantized(dtype)?,
                    down: l.down.quantized(dtype)?,
                    ..l.clone()
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            lm_head: self.lm_head.quantized(dtype)?,
            ..self.clone()
        })
    }

    pub fn assemble(
        cfg: &LlamaConfig,
        embed: Tensor,
        layers: Vec<RawLayer>,
        norm: Tensor,
        lm_head: Option<Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let q_dim = cfg.num_heads * cfg.head_dim;
        let kv_dim = cfg.num_kv_heads * cfg.head_dim;
        let f = cfg.intermediate_size;
        expect_shape("token embeddings", &embed, &[cfg.vocab_size, d])?;
        expect_shape("output norm", &norm, &[d])?;
        ensure!(
            layers.len() == cfg.num_layers,
            "found {} blocks, the config says {}",
            layers.len(),
            cfg.num_layers
        );
        let embed = f32_on(embed, device)?;
        let mut fused = Vec::with_capacity(layers.len());
        for (i, l) in layers.into_iter().enumerate() {
            let ctx = || format!("block {i}");
            expect_shape("attn_norm", &l.attn_norm, &[d]).with_context(ctx)?;
            expect_shape("q", &l.q, &[q_dim, d]).with_context(ctx)?;
            expect_shape("k", &l.k, &[kv_dim, d]).with_context(ctx)?;
            expect_shape("v", &l.v, &[kv_dim, d]).with_context(ctx)?;
            expect_shape("o", &l.o, &[d, q_dim]).with_context(ctx)?;
            expect_shape("ffn_norm", &l.ffn_norm, &[d]).with_context(ctx)?;
            expect_shape("gate", &l.gate, &[f, d]).with_context(ctx)?;
            expect_shape("up", &l.up, &[f, d]).with_context(ctx)?;
            expect_shape("down", &l.down, &[d, f]).with_context(ctx)?;
            ensure!(
                l.qkv_bias.is_some() == cfg.family.has_qkv_bias(),
                "block {i}: a {} model {} q/k/v biases",
                cfg.family.name(),
                if cfg.family.has_qkv_bias() {
                    "needs"
                } else {
                    "has no"
                }
            );
            let qkv_bias = match l.qkv_bias {
                Some([bq, bk, bv]) => {
                    expect_shape("q bias", &bq, &[q_dim]).with_context(ctx)?;
                    expect_shape("k bias", &bk, &[kv_dim]).with_context(ctx)?;
                    expect_shape("v bias", &bv, &[kv_dim]).with_context(ctx)?;
                    Some(f32_on(Tensor::cat(&[bq, bk, bv], 0)?, device)?)
                }
                None => None,
            };
            let qkv = Tensor::cat(&[l.q, l.k, l.v], 0)?;
            let gate_up = Tensor::cat(&[l.gate, l.up], 0)?;
            fused.push(LayerWeights {
                attn_norm: f32_on(l.attn_norm, device)?,
                qkv: FrozenLinear::new(&f32_on(qkv, device)?)?,
                qkv_bias,
                o: FrozenLinear::new(&f32_on(l.o, device)?)?,
                ffn_norm: f32_on(l.ffn_norm, device)?,
                gate_up: FrozenLinear::new(&f32_on(gate_up, device)?)?,
                down: FrozenLinear::new(&f32_on(l.down, device)?)?,
            });
        }
        let lm_head = match lm_head {
            Some(w) if !cfg.tie_word_embeddings => {
                expect_shape("lm_head", &w, &[cfg.vocab_size, d])?;
                FrozenLinear::new(&f32_on(w, device)?)?
            }
            _ => FrozenLinear::sharing(&embed)?,
        };
        Ok(Self {
            embed,
            layers: fused,
            norm: f32_on(norm, device)?,
            lm_head,
        })
    }
}

/// llama.cpp's converter permutes the q/k rows of llama GGUFs for its interleaved RoPE:
/// within each head, HF row `j` (first half) and `j + hd/2` (second half) become rows
/// `2j` and `2j + 1`. This undoes that so one `rotate_half` RoPE serves GGUF and HF alike.
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    ensure!(
        rows % (n_heads * 2) == 0,
        "q/k rows {rows} not divisible by 2 x {n_heads} heads"
    );
    let half = rows / n_heads / 2;
    Ok(w.reshape((n_heads, half, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()?)
}

/// The inverse of [`unpermute_qk`]: HF layout to llama.cpp's GGUF layout.
pub fn permute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    ensure!(
        rows % (n_heads * 2) == 0,
        "q/k rows {rows} not divisible by 2 x {n_heads} heads"
    );
    let half = rows / n_heads / 2;
    Ok(w.reshape((n_heads, 2, half, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()?)
}
