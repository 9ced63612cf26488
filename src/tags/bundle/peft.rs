//! PEFT prompt-tuning adapters: read as function tags without a head, and written back.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device};
use sha2::{Digest, Sha256};

use super::super::files::{publish, read_settled, temp_beside, write_atomic};
use super::super::template::is_valid_tag_name;
use super::{all_finite, BaseModelIdentity, TagBundle, TagKind, TagManifest};

pub const PEFT_CONFIG_FILE: &str = "adapter_config.json";
pub const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";

impl TagBundle {
    /// A PEFT prompt-tuning adapter: a soft prompt served as a function tag without head,
    /// named after its directory, whose default template puts it before the input.
    pub(super) fn load_peft(
        dir: &Path,
        dir_name: &str,
        base: &BaseModelIdentity,
        device: &Device,
    ) -> Result<Self> {
        ensure!(
            is_valid_tag_name(dir_name),
            "`{dir_name}` is not a valid tag name"
        );
        let cfg: serde_json::Value =
            serde_json::from_slice(&read_settled(&dir.join(PEFT_CONFIG_FILE))?)
                .context("adapter_config.json is not valid JSON")?;
        let peft_type = cfg.get("peft_type").and_then(|v| v.as_str()).unwrap_or("");
        ensure!(
            peft_type == "PROMPT_TUNING",
            "PEFT type `{peft_type}` is not supported (only PROMPT_TUNING)"
        );
        let bytes = read_settled(&dir.join(PEFT_WEIGHTS_FILE))
            .context("reading adapter_model.safetensors")?;
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
            anyhow!("reading adapter_model.safetensors (missing, truncated or corrupt?): {e}")
        })?;
        let vectors = tensors
            .remove("prompt_embeddings")
            .ok_or_else(|| anyhow!("adapter_model.safetensors has no `prompt_embeddings`"))?
            .to_dtype(DType::F32)?;
        let (p, d) = vectors
            .dims2()
            .context("prompt_embeddings must be a matrix")?;
        ensure!(p > 0, "prompt_embeddings is empty");
        ensure!(
            d == base.hidden_size,
            "prompt_embeddings width {d} does not match the model's {}",
            base.hidden_size
        );
        if let Some(n) = cfg.get("num_virtual_tokens").and_then(|v| v.as_u64()) {
            ensure!(
                n as usize == p,
                "num_virtual_tokens {n} but prompt_embeddings has {p} rows"
            );
        }
        ensure!(
            all_finite(&vectors)?,
            "prompt_embeddings contain NaN or infinity"
        );
        let manifest = TagManifest {
            name: dir_name.to_string(),
            kind: TagKind::Function,
            version: 1,
            num_vectors: p,
            hidden_size: d,
            base_model: base.fingerprint.clone(),
            head_positions: 1,
            head_hidden: 0,
            head: None,
            template: Some(format!("<{dir_name}>{{input}}")),
            domain_tags: Vec::new(),
            tensors_sha256: Some(hex::encode(Sha256::digest(&bytes))),
            provenance: serde_json::json!({"source": "peft", "adapter_config": cfg}),
            metrics: serde_json::Value::Null,
        };
        Ok(Self {
            manifest,
            vectors,
            head: None,
            source: "peft",
        })
    }

    /// Writes the tag's vectors as a PEFT prompt-tuning adapter directory.
    pub fn export_peft(&self, out: &Path, base_model_name: &str) -> Result<()> {
        std::fs::create_dir_all(out)?;
        let cfg = serde_json::json!({
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.num_vectors(),
            "token_dim": self.manifest.hidden_size,
            "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM",
            "base_model_name_or_path": base_model_name,
            "inference_mode": true,
        });
        let tmp = temp_beside(&out.join(PEFT_WEIGHTS_FILE));
        candle_core::safetensors::save(
            &HashMap::from([("prompt_embeddings".to_string(), self.vectors.clone())]),
            &tmp,
        )?;
        publish(&tmp, &out.join(PEFT_WEIGHTS_FILE))?;
        write_atomic(
            &out.join(PEFT_CONFIG_FILE),
            &serde_json::to_vec_pretty(&cfg)?,
        )
    }
}
