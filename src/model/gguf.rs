//! Loading a GGUF of a supported family (llama, qwen2): config from metadata, tensors
//! dequantized to f32 by candle (k-quants included), llama's q/k rows un-permuted,
//! tokenizer rebuilt from `tokenizer.ggml.*`.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::config::{Family, LlamaConfig};
use super::tokenizer::TextTokenizer;
use super::weights::{unpermute_qk, LlamaWeights, RawLayer};
use super::LoadedModel;

/// Tensor types we promise to load (candle dequantizes more, e.g. the k-quants).
const SUPPORTED: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key)
        .ok_or_else(|| anyhow!("GGUF metadata has no `{key}`"))
}

fn get_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    Ok(get(md, key)?
        .to_u32()
        .with_context(|| format!("GGUF `{key}`"))? as usize)
}

fn config_from_metadata(md: &HashMap<String, Value>, has_output: bool) -> Result<LlamaConfig> {
    let arch = get(md, "general.architecture")?.to_string()?.clone();
    let family = Family::from_name(&arch).ok_or_else(|| {
        anyhow!("unsupported architecture `{arch}` in GGUF (supported: llama, qwen2; mistral GGUFs use llama)")
    })?;
    // Hyper-parameters are keyed by the architecture's name: `llama.block_count`, ...
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(kind) = md
        .get(&key("rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
    {
        if kind != "none" {
            bail!("GGUF uses RoPE scaling `{kind}`, which is not supported yet");
        }
    }
    let hidden_size = get_usize(md, &key("embedding_length"))?;
    let num_heads = get_usize(md, &key("attention.head_count"))?;
    let vocab_size = match md.get(&key("vocab_size")) {
        Some(v) => v.to_u32()? as usize,
        None => get(md, "tokenizer.ggml.tokens")?.to_vec()?.len(),
    };
    let cfg = LlamaConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size: get_usize(md, &key("feed_forward_length"))?,
        num_layers: get_usize(md, &key("block_count"))?,
        num_heads,
        num_kv_heads: get_usize(md, &key("attention.head_count_kv")).unwrap_or(num_heads),
        head_dim: get_usize(md, &key("attention.key_length"))
            .unwrap_or(hidden_size / num_heads.max(1)),
        rope_theta: md
            .get(&key("rope.freq_base"))
            .map(|v| v.to_f32())
            .transpose()?
            .unwrap_or(10_000.0),
        rms_norm_eps: get(md, &key("attention.layer_norm_rms_epsilon"))?.to_f32()? as f64,
        max_position_embeddings: get_usize(md, &key("context_length")).unwrap_or(4096),
        tie_word_embeddings: !has_output,
    };
    cfg.validate()?;
    Ok(cfg)
}

pub fn load(path: &Path, device: &Device) -> Result<LoadedModel> {
    let file =
        File::open(path).with_context(|| format!("opening model file {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| {
        anyhow!(
            "{} is not a readable GGUF file (truncated or corrupt header?): {e}",
            path.display()
        )
    })?;
    let md = &content.metadata;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        bail!("GGUF has `rope_freqs.weight` (Llama 3.1-style RoPE scaling), which is not supported yet");
    }
    let cfg = config_from_metadata(md, content.tensor_infos.contains_key("output.weight"))?;

    // Fingerprint: every tensor's name, type, shape and raw (quantized) bytes, in name order,
    // so it identifies the weights whatever the metadata says.
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut hasher = Sha256::new();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in names {
        let info = &content.tensor_infos[name];
        if !SUPPORTED.contains(&info.ggml_dtype) {
            bail!(
                "tensor `{name}` has type {:?}, which tagllm does not load",
                info.ggml_dtype
            );
        }
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| {
                anyhow!(
                    "reading tensor `{name}` from {} (file truncated?): {e}",
                    path.display()
                )
            })?;
        hasher.update(name.as_bytes());
        hasher.update(format!("{:?}{:?}", info.ggml_dtype, q.shape().dims()).as_bytes());
        hasher.update(&q.data()?);
        tensors.insert(name.clone(), q.dequantize(&Device::Cpu)?);
    }
    let fingerprint = hex::encode(hasher.finalize());

    let mut take = |name: &str| -> Result<Tensor> {
        tensors
            .remove(name)
            .ok_or_else(|| anyhow!("GGUF has no tensor `{name}`"))
    };
    // llama.cpp permutes the q/k rows of llama-family files only (for its interleaved RoPE);
    // qwen2's keep HF's order.
    let hf_order = |w: Tensor, heads: usize| -> Result<Tensor> {
        match cfg.family {
            Family::Llama => unpermute_qk(&w, heads),
            Family::Qwen2 => Ok(w),
        }
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("blk.{i}");
        let qkv_bias = if cfg.family.has_qkv_bias() {
            let mut bias = |x: &str| take(&format!("{p}.attn_{x}.bias"));
            Some([bias("q")?, bias("k")?, bias("v")?])
        } else {
            None
        };
        layers.push(RawLayer {
            qkv_bias,
            attn_norm: take(&format!("{p}.attn_norm.weight"))?,
            q: hf_order(take(&format!("{p}.attn_q.weight"))?, cfg.num_heads)?,
            k: hf_order(take(&format!("{p}.attn_k.weight"))?, cfg.num_kv_heads)?,
            v: take(&format!("{p}.attn_v.weight"))?,
            o: take(&format!("{p}.attn_output.weight"))?,
            ffn_norm: take(&format!("{p}.ffn_norm.weight"))?,
            gate: take(&format!("{p}.ffn_gate.weight"))?,
            up: take(&format!("{p}.ffn_up.weight"))?,
            down: take(&format!("{p}.ffn_down.weight"))?,
        });
    }
    let embed = take("token_embd.weight")?;
    let norm = take("output_norm.weight")?;
    let lm_head = take("output.weight").ok();
    let weights = LlamaWeights::assemble(&cfg, embed, layers, norm, lm_head, device)?;
    let tokenizer = TextTokenizer::from_gguf_metadata(md)?;
    let name = md
        .get("general.name")
        .and_then(|v| v.to_string().ok().cloned());
    Ok(LoadedModel {
        config: cfg,
        weights,
        tokenizer,
        fingerprint,
        name,
        format: "gguf",
    })
}
