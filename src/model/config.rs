//! Hyper-parameters of a llama-family decoder, read from GGUF metadata or an HF `config.json`.

use serde::{Deserialize, Serialize};

/// The decoder families tagllm loads. One forward serves them all; what a family changes
/// is named where it matters (its weights' layout in a file, its tokenizer's pre-split).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Llama, Mistral, SmolLM2: GGUF q/k rows permuted by llama.cpp's converter.
    #[default]
    Llama,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections; GGUF rows in HF order.
    Qwen2,
}

impl Family {
    /// The name GGUF's `general.architecture` and HF's `model_type` give it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    /// The family of a GGUF architecture or HF model type (`mistral` files are llama's).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" | "mistral" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// Special tokens that end a generation besides the file's EOS: Qwen2.5's generation
    /// config stops at `<|endoftext|>` as well as `<|im_end|>` (its GGUF names only the
    /// latter).
    pub fn extra_eos(self) -> &'static [&'static str] {
        match self {
            Self::Llama => &[],
            Self::Qwen2 => &["<|endoftext|>"],
        }
    }

    /// Whether the q, k and v projections carry biases.
    pub fn has_qkv_bias(self) -> bool {
        self == Self::Qwen2
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Checks the relations the forward relies on, so a malformed file fails at load
    /// with a message instead of a shape error deep inside a matmul.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.num_heads > 0 && self.num_kv_heads > 0,
            "head counts must be positive"
        );
        anyhow::ensure!(
            self.num_heads.is_multiple_of(self.num_kv_heads),
            "num_heads {} is not a multiple of num_kv_heads {}",
            self.num_heads,
            self.num_kv_heads
        );
        anyhow::ensure!(
            self.head_dim.is_multiple_of(2),
            "head_dim {} must be even for RoPE",
            self.head_dim
        );
        anyhow::ensure!(
            self.hidden_size > 0 && self.vocab_size > 0,
            "empty model dimensions"
        );
        anyhow::ensure!(
            self.max_position_embeddings > 0,
            "max_position_embeddings must be positive"
        );
        Ok(())
    }

    /// Number of parameters of the model as it is held in memory (tied head counted once).
    pub fn parameter_count(&self) -> usize {
        let d = self.hidden_size;
        let kv = self.num_kv_heads * self.head_dim;
        let q = self.num_heads * self.head_dim;
        let per_layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_layers * per_layer + d + head
    }
}

/// The subset of an HF `config.json` we need (llama / mistral style).
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

impl HfConfig {
    pub fn to_llama(&self) -> anyhow::Result<LlamaConfig> {
        let kind = self.model_type.as_deref().unwrap_or("llama");
        let family = Family::from_name(kind).ok_or_else(|| {
            anyhow::anyhow!(
                "unsupported architecture `{kind}` in config.json (supported: llama, mistral, qwen2)"
            )
        })?;
        if let Some(scaling) = &self.rope_scaling {
            anyhow::ensure!(
                scaling.is_null(),
                "rope_scaling {scaling} is not supported yet; only plain RoPE models load"
            );
        }
        let cfg = LlamaConfig {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
