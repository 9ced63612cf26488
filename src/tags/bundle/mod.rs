//! Tag bundles on disk: `tags/NAME/manifest.json` + `tags/NAME/tag.safetensors`
//! (`native.rs`), or a PEFT prompt-tuning adapter directory (`adapter_config.json` +
//! `adapter_model.safetensors`, `peft.rs`); `manifest.rs` is what a bundle says of itself.

mod manifest;
mod native;
mod peft;
#[cfg(test)]
pub(crate) mod tests;

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};

use super::files::ensure_not_symlink;
pub use manifest::{regression_value, BaseModelIdentity, HeadSpec, TagKind, TagManifest};
pub use native::{MANIFEST_FILE, TENSORS_FILE};
pub use peft::{PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE};

/// A head's parameters: `weight` `[k, positions * d]` and `bias` `[k]` for a linear head;
/// with a hidden layer, `hidden` (`[h, positions * d]`, `[h]`) and tanh first, and `weight`
/// is `[k, h]`.
#[derive(Debug, Clone)]
pub struct Head {
    pub spec: HeadSpec,
    /// How many of its tag's last positions it reads, concatenated.
    pub positions: usize,
    pub hidden: Option<(Tensor, Tensor)>,
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Head {
    /// The head's outputs `[n, k]` for its inputs `[n, positions * d]`.
    pub fn forward(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self.hidden.as_ref().map(|(w, b)| (w, b));
        head_output(&head_hidden(input, hidden)?, &self.weight, &self.bias)
    }
}

/// What a head's output layer reads: its inputs, or its hidden layer's tanh units
/// (`weight` `[h, inputs]`, `bias` `[h]`). Serving and training both go through these two
/// (training with its variables' tensors), so a trained head is served as it was trained.
pub fn head_hidden(
    input: &Tensor,
    hidden: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<Tensor> {
    match hidden {
        Some((w, b)) => input.matmul(&w.t()?)?.broadcast_add(b)?.tanh(),
        None => Ok(input.clone()),
    }
}

/// A head's output layer: `[n, k]` from what it reads.
pub fn head_output(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&weight.t()?)?.broadcast_add(bias)
}

#[derive(Debug, Clone)]
pub struct TagBundle {
    pub manifest: TagManifest,
    /// `[p, d]`
    pub vectors: Tensor,
    pub head: Option<Head>,
    /// `peft` or `bundle`.
    pub source: &'static str,
}

fn all_finite(t: &Tensor) -> Result<bool> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().all(|x| x.is_finite()))
}

impl TagBundle {
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn version(&self) -> u64 {
        self.manifest.version
    }

    pub fn num_vectors(&self) -> usize {
        self.manifest.num_vectors
    }

    /// Loads and validates the bundle in `dir` (a tagllm bundle or a PEFT adapter).
    pub fn load(dir: &Path, base: &BaseModelIdentity, device: &Device) -> Result<Self> {
        ensure_not_symlink(dir)?;
        let dir_name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("bad bundle directory name"))?;
        if dir.join(MANIFEST_FILE).exists() {
            Self::load_bundle(dir, dir_name, base, device)
        } else if dir.join(PEFT_CONFIG_FILE).exists() {
            Self::load_peft(dir, dir_name, base, device)
        } else {
            bail!("neither {MANIFEST_FILE} nor {PEFT_CONFIG_FILE} found")
        }
    }
}
