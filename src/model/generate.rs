//! Autoregressive decoding from input embeddings with a KV cache, one sequence at a time.
//! Sampling is candle-transformers' `LogitsProcessor` (greedy at temperature 0).

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Serialize;

use super::llama::Mode;
use super::BaseModel;

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    /// 0 or `None`: greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Decoding stops when the text ends with one of these; it is cut from the text.
    pub stop: Vec<String>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: None,
            top_p: None,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    Length,
    Stop,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// New token ids, the EOS included when decoding ended on it.
    pub ids: Vec<u32>,
    /// Decoded new ids (special tokens kept), cut at a stop sequence.
    pub text: String,
    pub finish_reason: FinishReason,
}

fn sampler(p: &GenerationParams) -> LogitsProcessor {
    let sampling = match (p.temperature, p.top_p) {
        (None, _) => Sampling::ArgMax,
        (Some(t), _) if t <= 0.0 => Sampling::ArgMax,
        (Some(temperature), Some(p)) if p < 1.0 => Sampling::TopP { p, temperature },
        (Some(temperature), _) => Sampling::All { temperature },
    };
    LogitsProcessor::from_sampling(p.seed, sampling)
}

/// Generates after a prompt given as embeddings `[s, d]` (tags may be spliced in).
pub fn generate(
    model: &BaseModel,
    prompt: &Tensor,
    params: &GenerationParams,
) -> Result<Generation> {
    let llama = &model.llama;
    let (s, _) = prompt.dims2()?;
    ensure!(s > 0, "empty prompt");
    let mut cache = llama.new_cache();
    let mut sampler = sampler(params);
    let eos = model.tokenizer.eos_ids();
    let mut ids = Vec::new();
    let mut input = prompt.unsqueeze(0)?;
    let mut finish = FinishReason::Length;
    for _ in 0..params.max_new_tokens {
        let hidden = llama.forward(&input, None, Some(&mut cache), Mode::Fast)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        let logits = llama.logits(&last)?.flatten_all()?.to_dtype(DType::F32)?;
        let next = sampler.sample(&logits)?;
        ids.push(next);
        if eos.contains(&next) {
            finish = FinishReason::Eos;
            break;
        }
        if !params.stop.is_empty() {
            let mut text = model.tokenizer.decode(&ids, false)?;
            if let Some(cut) = params
                .stop
                .iter()
                .filter_map(|st| text.find(st.as_str()))
                .min()
            {
                text.truncate(cut);
                finish = FinishReason::Stop;
                return Ok(Generation {
                    ids,
                    text,
                    finish_reason: finish,
                });
            }
        }
        input = llama.embed_ids(&[next])?.unsqueeze(0)?;
    }
    let text = model.tokenizer.decode(&ids, false)?;
    Ok(Generation {
        ids,
        text,
        finish_reason: finish,
    })
}
