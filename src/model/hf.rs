//! Loading an HF model directory: `config.json`, `tokenizer.json`, one or more
//! `*.safetensors` (llama / mistral naming; tied or untied embeddings).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::config::HfConfig;
use super::tokenizer::TextTokenizer;
use super::weights::{LlamaWeights, RawLayer};
use super::LoadedModel;

fn ids_of(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading model directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.safetensors file in {}", dir.display());
    }
    Ok(files)
}

pub fn load(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let raw =
        std::fs::read(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let hf: HfConfig =
        serde_json::from_slice(&raw).with_context(|| format!("parsing {}", cfg_path.display()))?;
    if let Some(archs) = &hf.architectures {
        if let Some(a) = archs.iter().find(|a| {
            !matches!(
                a.as_str(),
                "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM"
            )
        }) {
            bail!("unsupported architecture `{a}` in config.json (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)");
        }
    }
    let cfg = hf.to_llama()?;
    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; tagllm never writes model files while serving.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
        anyhow!(
            "reading safetensors in {} (truncated or corrupt?): {e}",
            dir.display()
        )
    })?;

    let mut listed = st.tensors();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (name, view) in &listed {
        hasher.update(name.as_bytes());
        hasher.update(format!("{:?}{:?}", view.dtype(), view.shape()).as_bytes());
        hasher.update(view.data());
    }
    let fingerprint = hex::encode(hasher.finalize());

    let get = |name: &str| -> Result<Tensor> {
        st.load(name, &Device::Cpu)
            .map_err(|e| anyhow!("tensor `{name}`: {e}"))
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        layers.push(RawLayer {
            attn_norm: get(&format!("{p}.input_layernorm.weight"))?,
            q: get(&format!("{p}.self_attn.q_proj.weight"))?,
            k: get(&format!("{p}.self_attn.k_proj.weight"))?,
            v: get(&format!("{p}.self_attn.v_proj.weight"))?,
            o: get(&format!("{p}.self_attn.o_proj.weight"))?,
            ffn_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
            gate: get(&format!("{p}.mlp.gate_proj.weight"))?,
            up: get(&format!("{p}.mlp.up_proj.weight"))?,
            down: get(&format!("{p}.mlp.down_proj.weight"))?,
            qkv_bias: if cfg.family.has_qkv_bias() {
                let bias = |x: &str| get(&format!("{p}.self_attn.{x}_proj.bias"));
                Some([bias("q")?, bias("k")?, bias("v")?])
            } else {
                None
            },
        });
    }
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(get("lm_head.weight")?)
    };
    let weights = LlamaWeights::assemble(
        &cfg,
        get("model.embed_tokens.weight")?,
        layers,
        get("model.norm.weight")?,
        lm_head,
        device,
    )?;
    let bos = ids_of(&hf.bos_token_id).first().copied();
    let tokenizer = TextTokenizer::from_hf_dir(dir, ids_of(&hf.eos_token_id), bos)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    Ok(LoadedModel {
        config: cfg,
        weights,
        tokenizer,
        fingerprint,
        name,
        format: "safetensors",
    })
}
