//! Autoregressive decoding from input embeddings. Sampling is candle-transformers'
//! `LogitsProcessor` (greedy at temperature 0). A `Decoder` is one generation; alone it
//! advances one token per `step` over its own KV cache (`generate` runs one to the end);
//! a server decodes many together in a `DecodeBatch`, over one persistent slot cache.
//!
//! `batch.rs` is the `DecodeBatch`; `text.rs` turns ids into streamed text.

mod batch;
mod text;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Serialize;

use super::kv::{KvCache, PromptRows};
use super::llama::Mode;
use super::BaseModel;
pub use batch::{DecodeBatch, Joined};
pub use text::TextStream;

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    /// 0 or `None`: greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Decoding stops when the text contains one of these; the text is cut before it.
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
    /// Decoded new ids (the EOS, the only special token a generation can hold, left out),
    /// cut at a stop sequence.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// Below these, sampling is greedy decoding in the limit; dividing logits by a temperature
/// like 1e-300 overflows and a nucleus like 1e-300 can keep nothing, so take the limit.
const GREEDY_TEMPERATURE: f64 = 1e-4;
const GREEDY_TOP_P: f64 = 1e-6;
/// Above this, sampling is uniform over the nucleus in the limit (logits span tens, so
/// divided by 1e3 they differ by hundredths); dividing by 1e308 in f32 makes them 0 and
/// the masked ones NaN, so take the limit here too.
const MAX_TEMPERATURE: f64 = 1e3;

fn sampler(p: &GenerationParams) -> LogitsProcessor {
    let temperature = p.temperature.map(|t| t.min(MAX_TEMPERATURE));
    let sampling = match (temperature, p.top_p) {
        (None, _) => Sampling::ArgMax,
        (Some(t), _) if t < GREEDY_TEMPERATURE => Sampling::ArgMax,
        (Some(_), Some(p)) if p < GREEDY_TOP_P => Sampling::ArgMax,
        (Some(temperature), Some(p)) if p < 1.0 => Sampling::TopP { p, temperature },
        (Some(temperature), _) => Sampling::All { temperature },
    };
    LogitsProcessor::from_sampling(p.seed, sampling)
}

/// One generation in progress: its sampler, ids, stop strings and limits, and — when it
/// decodes alone — its own KV cache. Many generations decode together in a
/// [`DecodeBatch`] instead.
pub struct Decoder {
    pub(super) params: GenerationParams,
    pub(super) cache: KvCache,
    pub(super) sampler: LogitsProcessor,
    pub(super) ids: Vec<u32>,
    /// The prompt, until a step (or a batch's prefill) has run it.
    pub(super) prompt: Option<Tensor>,
    /// Prompt positions already in `cache` (a prompt prefilled in chunks, or the part of it
    /// found in a batch's prefix cache).
    pub(super) prefilled: usize,
    /// The prompt's rows, for a batch's prefix cache: compared with cached prompts once
    /// (`reuse_checked`), and kept with its keys and values once prefilled.
    pub(super) rows: Option<PromptRows>,
    pub(super) reuse_checked: bool,
    pub(super) text: String,
    pub(super) finish: Option<FinishReason>,
    /// Ids to re-decode when looking for a stop string that the newest id may complete:
    /// enough to hold the longest one, plus a character's worth of partial bytes.
    pub(super) stop_window: usize,
}

impl Decoder {
    /// A decoder for a prompt given as embeddings `[s, d]` (tags may be spliced in).
    pub fn new(model: &BaseModel, prompt: &Tensor, params: &GenerationParams) -> Result<Self> {
        let (s, _) = prompt.dims2()?;
        ensure!(s > 0, "empty prompt");
        Ok(Self {
            params: params.clone(),
            cache: model.llama.new_cache(),
            sampler: sampler(params),
            ids: Vec::new(),
            prompt: Some(prompt.unsqueeze(0)?),
            prefilled: 0,
            rows: None,
            reuse_checked: false,
            text: String::new(),
            finish: (params.max_new_tokens == 0).then_some(FinishReason::Length),
            stop_window: params.stop.iter().map(String::len).max().unwrap_or(0) + 4,
        })
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The ids generated so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Prompt positions not yet prefilled.
    pub fn prompt_left(&self) -> usize {
        self.prompt
            .as_ref()
            .map_or(0, |p| p.dim(1).unwrap_or(0).saturating_sub(self.prefilled))
    }

    /// The prompt's length (positions).
    pub fn prompt_len(&self) -> usize {
        self.prompt.as_ref().map_or(0, |p| p.dim(1).unwrap_or(0))
    }

    /// Steps it may still take (new tokens left).
    pub fn steps_left(&self) -> usize {
        if self.finish.is_some() {
            0
        } else {
            self.params.max_new_tokens.saturating_sub(self.ids.len())
        }
    }

    /// Runs the next `n` positions of the prompt into its own cache; once the prompt is
    /// done, returns the logits `[vocab]` of its last position.
    pub(super) fn prefill_part(&mut self, model: &BaseModel, n: usize) -> Result<Option<Tensor>> {
        let prompt = self
            .prompt
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("a decoder without a prompt to prefill"))?;
        let part = prompt.narrow(1, self.prefilled, n)?;
        let hidden = model
            .llama
            .forward(&part, None, Some(&mut self.cache), Mode::Fast)?;
        self.prefilled += n;
        if self.prompt_left() > 0 {
            return Ok(None);
        }
        self.prompt = None;
        let last = hidden.narrow(1, n - 1, 1)?;
        Ok(Some(model.llama.logits(&last)?.flatten_all()?))
    }

    /// Runs the model once (the prompt, then one token at a time) and samples one token.
    /// Returns whether decoding has finished.
    pub fn step(&mut self, model: &BaseModel) -> Result<bool> {
        if self.finish.is_some() {
            return Ok(true);
        }
        let llama = &model.llama;
        let input = match self.prompt.take() {
            Some(p) => p,
            None => self.next_input(model)?,
        };
        let hidden = llama.forward(&input, None, Some(&mut self.cache), Mode::Fast)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        let logits = llama.logits(&last)?.flatten_all()?;
        self.advance(model, &logits)
    }

    /// The embedding `[1, 1, d]` of the last sampled token.
    pub(super) fn next_input(&self, model: &BaseModel) -> Result<Tensor> {
        let last = *self
            .ids
            .last()
            .ok_or_else(|| anyhow::anyhow!("no token sampled yet"))?;
        Ok(model.llama.embed_ids(&[last])?.unsqueeze(0)?)
    }

    /// Samples the next token from `logits` `[vocab]` and updates the state. Special tokens
    /// other than an EOS are never sampled: generated text holds no control tokens.
    pub(super) fn advance(&mut self, model: &BaseModel, logits: &Tensor) -> Result<bool> {
        let mut logits = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for &id in model.tokenizer.never_generated() {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let next = self
            .sampler
            .sample(&Tensor::new(logits, &candle_core::Device::Cpu)?)?;
        self.ids.push(next);
        if model.tokenizer.eos_ids().contains(&next) {
            self.finish = Some(FinishReason::Eos);
        } else if !self.params.stop.is_empty() {
            // Only a stop string ending in the newest token is new: look at the last few
            // ids, and decode everything once only when one is there.
            let recent = &self.ids[self.ids.len().saturating_sub(self.stop_window)..];
            let tail = model.tokenizer.decode(recent, true)?;
            if self.params.stop.iter().any(|st| tail.contains(st.as_str())) {
                let text = model.tokenizer.decode(&self.ids, true)?;
                if let Some(cut) = self
                    .params
                    .stop
                    .iter()
                    .filter_map(|st| text.find(st.as_str()))
                    .min()
                {
                    self.text = text[..cut].to_string();
                    self.finish = Some(FinishReason::Stop);
                }
            }
        }
        if self.finish.is_none() && self.ids.len() >= self.params.max_new_tokens {
            self.finish = Some(FinishReason::Length);
        }
        Ok(self.finish.is_some())
    }

    pub fn finish(self, model: &BaseModel) -> Result<Generation> {
        let finish_reason = self.finish.unwrap_or(FinishReason::Length);
        let text = match finish_reason {
            FinishReason::Stop => self.text,
            _ => model.tokenizer.decode(&self.ids, true)?,
        };
        Ok(Generation {
            ids: self.ids,
            text,
            finish_reason,
        })
    }
}

/// Generates after a prompt given as embeddings `[s, d]`, to the end.
pub fn generate(
    model: &BaseModel,
    prompt: &Tensor,
    params: &GenerationParams,
) -> Result<Generation> {
    let mut d = Decoder::new(model, prompt, params)?;
    while !d.step(model)? {}
    d.finish(model)
}
