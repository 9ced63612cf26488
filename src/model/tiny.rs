//! A tiny llama made by the project itself: seeded random weights, a few layers, a small
//! byte-level BPE vocabulary and a ChatML template. Written as a GGUF (quantized like the
//! default model, q/k rows permuted like llama.cpp's converter) or as an HF directory, so
//! tests exercise both loaders and every layer above them in seconds.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{Family, LlamaConfig};
use super::weights::permute_qk;

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 12] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("C", "C"),
    ("a", "n"),
    ("Ġ", "a"),
    ("o", "n"),
    ("r", "e"),
    ("Ġ", "s"),
    ("e", "s"),
];
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// GPT-2's byte -> printable unicode table used by byte-level BPE vocabularies.
fn byte_chars() -> Vec<char> {
    let printable: Vec<u32> = ('!' as u32..='~' as u32)
        .chain('¡' as u32..='¬' as u32)
        .chain('®' as u32..='ÿ' as u32)
        .collect();
    let mut table = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if printable.contains(&b) {
            table[b as usize] = char::from(b as u8);
        } else {
            // 256..324: all valid scalar values.
            table[b as usize] = char::from_u32(256 + extra).unwrap_or(char::REPLACEMENT_CHARACTER);
            extra += 1;
        }
    }
    table
}

/// The tiny vocabulary: specials, then the 256 byte symbols, then merged tokens.
pub fn tiny_vocab() -> Vec<String> {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_chars().into_iter().map(String::from));
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    tokens
}

pub fn tiny_config(tie_word_embeddings: bool) -> LlamaConfig {
    tiny_config_of(Family::Llama, tie_word_embeddings)
}

/// The tiny model's hyper-parameters for a family: the same shapes in every family.
pub fn tiny_config_of(family: Family, tie_word_embeddings: bool) -> LlamaConfig {
    LlamaConfig {
        family,
        vocab_size: tiny_vocab().len(),
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        // A power of two, so GGUF's f32 field and config.json's f64 hold the same value.
        rms_norm_eps: 1.0 / 131_072.0,
        max_position_embeddings: 512,
        tie_word_embeddings,
    }
}

/// HF-layout f32 tensors of the tiny model, by HF name.
fn tiny_tensors(cfg: &LlamaConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mat = |rows: usize, cols: usize, scale: f32| -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
    };
    let d = cfg.hidden_size;
    let (q, kv, f) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    );
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        mat(cfg.vocab_size, d, 1.0)?,
    )];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        out.push((
            format!("{p}.input_layernorm.weight"),
            (mat(1, d, 0.2)? + 1.0)?.squeeze(0)?,
        ));
        out.push((format!("{p}.self_attn.q_proj.weight"), mat(q, d, 0.25)?));
        out.push((format!("{p}.self_attn.k_proj.weight"), mat(kv, d, 0.25)?));
        out.push((format!("{p}.self_attn.v_proj.weight"), mat(kv, d, 0.25)?));
        if cfg.family.has_qkv_bias() {
            for (x, n) in [("q", q), ("k", kv), ("v", kv)] {
                let bias = mat(1, n, 0.5)?.squeeze(0)?;
                out.push((format!("{p}.self_attn.{x}_proj.bias"), bias));
            }
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), mat(d, q, 0.15)?));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            (mat(1, d, 0.2)? + 1.0)?.squeeze(0)?,
        ));
        out.push((format!("{p}.mlp.gate_proj.weight"), mat(f, d, 0.25)?));
        out.push((format!("{p}.mlp.up_proj.weight"), mat(f, d, 0.25)?));
        out.push((format!("{p}.mlp.down_proj.weight"), mat(d, f, 0.15)?));
    }
    out.push((
        "model.norm.weight".to_string(),
        (mat(1, d, 0.2)? + 1.0)?.squeeze(0)?,
    ));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), mat(cfg.vocab_size, d, 0.5)?));
    }
    Ok(out)
}

fn gguf_name(hf: &str) -> Result<String> {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return Ok(g.to_string());
    }
    let (i, name) = hf
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .ok_or_else(|| anyhow::anyhow!("`{hf}` is not a layer tensor"))?;
    let g = match name {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => anyhow::bail!("unmapped tensor {other}"),
    };
    Ok(format!("blk.{i}.{g}"))
}

/// The tokenizer part of the tiny GGUF's metadata (the family's pre-tokenizer).
fn tokenizer_metadata(family: Family) -> Vec<(&'static str, Value)> {
    let vocab = tiny_vocab();
    let s = |x: &str| Value::String(x.to_string());
    let types = (0..vocab.len())
        .map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    vec![
        ("tokenizer.ggml.model", s("gpt2")),
        (
            "tokenizer.ggml.pre",
            s(match family {
                Family::Llama => "smollm",
                Family::Qwen2 => "qwen2",
            }),
        ),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vocab.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(MERGES.iter().map(|(a, b)| s(&format!("{a} {b}"))).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", s(CHAT_TEMPLATE)),
    ]
}

/// Writes the tiny model as a GGUF: matrices in `matrix_type`, the embedding in Q8_0 when
/// the matrices are quantized (as in the default model), norms in F32.
pub fn write_tiny_gguf(path: &Path, matrix_type: GgmlDType, seed: u64, tie: bool) -> Result<()> {
    write_tiny_gguf_of(path, Family::Llama, matrix_type, seed, tie)
}

/// [`write_tiny_gguf`] for a family: its tensors (qwen2's biases), its metadata keys, and
/// its layout (llama.cpp permutes llama's q/k rows only).
pub fn write_tiny_gguf_of(
    path: &Path,
    family: Family,
    matrix_type: GgmlDType,
    seed: u64,
    tie: bool,
) -> Result<()> {
    let cfg = tiny_config_of(family, tie);
    let permuted = family == Family::Llama;
    let mut qtensors = Vec::new();
    for (hf, t) in tiny_tensors(&cfg, seed)? {
        let t = if permuted && hf.ends_with("q_proj.weight") {
            permute_qk(&t, cfg.num_heads)?
        } else if permuted && hf.ends_with("k_proj.weight") {
            permute_qk(&t, cfg.num_kv_heads)?
        } else {
            t
        };
        let ty = if t.rank() == 1 {
            GgmlDType::F32
        } else if hf == "model.embed_tokens.weight"
            && matrix_type != GgmlDType::F32
            && matrix_type != GgmlDType::F16
        {
            GgmlDType::Q8_0
        } else {
            matrix_type
        };
        qtensors.push((gguf_name(&hf)?, QTensor::quantize(&t, ty)?));
    }
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    let arch = family.name();
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s("tagllm-tiny")),
    ];
    for (key, value) in [
        ("block_count", u(cfg.num_layers)),
        ("context_length", u(cfg.max_position_embeddings)),
        ("embedding_length", u(cfg.hidden_size)),
        ("feed_forward_length", u(cfg.intermediate_size)),
        ("attention.head_count", u(cfg.num_heads)),
        ("attention.head_count_kv", u(cfg.num_kv_heads)),
        ("rope.freq_base", Value::F32(cfg.rope_theta)),
        (
            "attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("vocab_size", u(cfg.vocab_size)),
    ] {
        metadata.push((format!("{arch}.{key}"), value));
    }
    metadata.extend(
        tokenizer_metadata(family)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    let md_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = path.with_extension("gguf.tmp");
    {
        let mut w = BufWriter::new(
            File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        gguf_file::write(&mut w, &md_refs, &t_refs)?;
        std::io::Write::flush(&mut w)?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Writes the same tiny model (same seed -> same weights) as an HF directory:
/// `config.json`, `tokenizer.json`, `tokenizer_config.json`, `model.safetensors` (f32).
pub fn write_tiny_hf(dir: &Path, seed: u64, tie: bool) -> Result<()> {
    write_tiny_hf_of(dir, Family::Llama, seed, tie)
}

/// [`write_tiny_hf`] for a family.
pub fn write_tiny_hf_of(dir: &Path, family: Family, seed: u64, tie: bool) -> Result<()> {
    let cfg = tiny_config_of(family, tie);
    let architecture = match family {
        Family::Llama => "LlamaForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
    };
    std::fs::create_dir_all(dir)?;
    let tensors: HashMap<String, Tensor> = tiny_tensors(&cfg, seed)?.into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": [architecture], "model_type": family.name(),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let tok_cfg = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false,
        "chat_template": CHAT_TEMPLATE,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&tok_cfg)?,
    )?;
    // The HF tokenizer is the one the GGUF loader rebuilds from the same vocabulary.
    let gguf_tok = tiny_tokenizer_of(family)?;
    gguf_tok
        .inner()
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?;
    Ok(())
}

/// The tiny model's tokenizer, built through the GGUF metadata path.
pub fn tiny_tokenizer() -> Result<super::TextTokenizer> {
    tiny_tokenizer_of(Family::Llama)
}

/// The tiny model's tokenizer with a family's pre-tokenizer.
pub fn tiny_tokenizer_of(family: Family) -> Result<super::TextTokenizer> {
    let md: HashMap<String, Value> = tokenizer_metadata(family)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    super::TextTokenizer::from_gguf_metadata(&md)
}
