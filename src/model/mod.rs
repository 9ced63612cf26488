//! The frozen base LLM: loading (GGUF or HF safetensors), tokenizer, and the
//! embeddings-in forward. Knows nothing of tags, HTTP or training jobs.

pub mod catalogue;
pub mod config;
pub mod device;
mod disjoint;
pub mod generate;
mod gguf;
mod hf;
pub mod kv;
pub mod linear;
pub mod llama;
mod q8_matvec;
pub mod threads;
pub mod tiny;
pub mod tokenizer;
mod vec_math;
pub mod weights;

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

pub use config::{Family, LlamaConfig};
pub use generate::{
    generate, DecodeBatch, Decoder, FinishReason, Generation, GenerationParams, TextStream,
};
pub use kv::{KvCache, SlotKv};
pub use llama::{pad_right, rows_at, rows_ending_at, Llama, Mode};
pub use tokenizer::{ChatPiece, TextTokenizer};

/// How the serving forward reads the frozen matrices. Training always uses f32; a q8_0
/// serving copy trades a small drift (docs/serving.md: serving precision) for a quarter of the
/// bytes read per token. (q4_0 was measured and drifts too far to offer.) q8_0 serves
/// decoding steps only: prompts (and so every head) are computed in f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// q8_0 on CPU (decoding 3-5x faster, `<Translate>` chrF within 1%), f32 on a GPU.
    #[default]
    Auto,
    F32,
    Q8_0,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Q8_0 => "q8_0",
        }
    }

    /// The precision `Auto` stands for on `device`; the others stand for themselves.
    pub fn on(self, device: &Device) -> Self {
        match self {
            Self::Auto if device.is_cpu() => Self::Q8_0,
            Self::Auto => Self::F32,
            other => other,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "q8_0" => Ok(Self::Q8_0),
            _ => bail!("unknown precision {s:?} (auto, f32 or q8_0)"),
        }
    }
}

/// Where `scripts/setup-model.sh` puts the default model.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// What a loader hands back before the forward is built.
pub(crate) struct LoadedModel {
    pub config: LlamaConfig,
    pub weights: weights::LlamaWeights,
    pub tokenizer: TextTokenizer,
    pub fingerprint: String,
    pub name: Option<String>,
    pub format: &'static str,
}

/// The base model, loaded once and shared (it is immutable after loading).
#[derive(Debug, Clone)]
pub struct BaseModel {
    pub llama: Llama,
    pub tokenizer: TextTokenizer,
    /// sha256 over every weight tensor (name, type, shape, bytes): tags record it so a tag
    /// trained for other weights can be refused.
    pub fingerprint: String,
    pub name: String,
    pub format: &'static str,
    pub path: PathBuf,
}

fn is_gguf(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

impl BaseModel {
    /// Loads a GGUF file or an HF model directory.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if !path.exists() {
            let hint = if path == Path::new(DEFAULT_MODEL_PATH) {
                " (run scripts/setup-model.sh to fetch the default model)"
            } else {
                ""
            };
            bail!("model path {} does not exist{hint}", path.display());
        }
        let loaded = if path.is_dir() {
            hf::load(path, device)?
        } else if is_gguf(path)? {
            gguf::load(path, device)?
        } else {
            bail!(
                "{} is neither a GGUF file nor an HF model directory",
                path.display()
            );
        };
        let LoadedModel {
            config,
            weights,
            mut tokenizer,
            fingerprint,
            name,
            format,
        } = loaded;
        // The family's EOS set, whichever format named the first.
        for eos in config.family.extra_eos() {
            tokenizer.add_eos(eos);
        }
        let llama = Llama::new(config, weights, device)?;
        let name = name.unwrap_or_else(|| path.display().to_string());
        Ok(Self {
            llama,
            tokenizer,
            fingerprint,
            name,
            format,
            path: path.to_path_buf(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        self.llama.config()
    }

    /// A serving copy at `precision` (itself, shared, for f32). Tensors are shared; the
    /// quantized matrices are the only new memory (~a quarter of f32 for q8_0).
    pub fn at_precision(
        self: &std::sync::Arc<Self>,
        precision: Precision,
    ) -> Result<std::sync::Arc<Self>> {
        use candle_core::quantized::GgmlDType;
        let dtype = match precision.on(self.device()) {
            Precision::F32 | Precision::Auto => return Ok(self.clone()),
            Precision::Q8_0 => GgmlDType::Q8_0,
        };
        Ok(std::sync::Arc::new(Self {
            llama: self.llama.quantized(dtype)?,
            ..(**self).clone()
        }))
    }

    pub fn device(&self) -> &Device {
        self.llama.device()
    }

    /// Embeddings `[n, d]` of a text fragment.
    pub fn embed_text(&self, text: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(text)?;
        self.llama.embed_ids(&ids)
    }
}

#[cfg(test)]
mod precision_tests {
    use super::*;

    #[test]
    fn auto_precision_is_q8_0_on_cpu_and_names_parse() {
        assert_eq!(Precision::default(), Precision::Auto);
        assert_eq!(Precision::Auto.on(&Device::Cpu), Precision::Q8_0);
        assert_eq!(Precision::F32.on(&Device::Cpu), Precision::F32);
        for p in [Precision::Auto, Precision::F32, Precision::Q8_0] {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
    }
}
