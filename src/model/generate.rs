//! Autoregressive decoding from input embeddings with a KV cache, one sequence at a time.
//! Sampling is candle-transformers' `LogitsProcessor` (greedy at temperature 0).
//! `Decoder` advances one token per `step`, so a server can interleave many generations
//! with other work; `generate` runs one to the end.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Serialize;

use super::llama::{KvCache, Mode};
use super::BaseModel;

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

fn sampler(p: &GenerationParams) -> LogitsProcessor {
    let sampling = match (p.temperature, p.top_p) {
        (None, _) => Sampling::ArgMax,
        (Some(t), _) if t < GREEDY_TEMPERATURE => Sampling::ArgMax,
        (Some(_), Some(p)) if p < GREEDY_TOP_P => Sampling::ArgMax,
        (Some(temperature), Some(p)) if p < 1.0 => Sampling::TopP { p, temperature },
        (Some(temperature), _) => Sampling::All { temperature },
    };
    LogitsProcessor::from_sampling(p.seed, sampling)
}

/// One generation in progress.
pub struct Decoder {
    params: GenerationParams,
    cache: KvCache,
    sampler: LogitsProcessor,
    ids: Vec<u32>,
    /// What the next step feeds the model: the prompt first, then the last token.
    input: Tensor,
    text: String,
    finish: Option<FinishReason>,
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
            input: prompt.unsqueeze(0)?,
            text: String::new(),
            finish: (params.max_new_tokens == 0).then_some(FinishReason::Length),
        })
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The ids generated so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Runs the model once and samples one token. Returns whether decoding has finished.
    pub fn step(&mut self, model: &BaseModel) -> Result<bool> {
        if self.finish.is_some() {
            return Ok(true);
        }
        let llama = &model.llama;
        let hidden = llama.forward(&self.input, None, Some(&mut self.cache), Mode::Fast)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        let logits = llama.logits(&last)?.flatten_all()?;
        self.advance(model, &logits)
    }

    /// Past its prompt, a decoder feeds one token per step: such steps batch.
    fn decoding(&self) -> bool {
        self.finish.is_none() && !self.cache.is_empty() && self.input.dim(1).is_ok_and(|n| n == 1)
    }

    /// Advances every decoder by one token. Decoders past their prompt share one batched
    /// forward (their caches are stacked, then split again); the others step alone.
    pub fn step_many(decoders: &mut [&mut Decoder], model: &BaseModel) -> Vec<Result<bool>> {
        let batched: Vec<usize> = (0..decoders.len())
            .filter(|&i| decoders[i].decoding())
            .collect();
        let mut out: Vec<Option<Result<bool>>> = (0..decoders.len()).map(|_| None).collect();
        if batched.len() >= 2 {
            let mut run = || -> Result<Vec<Tensor>> {
                let caches: Vec<&KvCache> = batched.iter().map(|&i| &decoders[i].cache).collect();
                let mut cache = KvCache::stack(&caches, &model.llama)?;
                let inputs: Vec<&Tensor> = batched.iter().map(|&i| &decoders[i].input).collect();
                let hidden = model.llama.forward(
                    &Tensor::cat(&inputs, 0)?,
                    None,
                    Some(&mut cache),
                    Mode::Fast,
                )?;
                let logits = model.llama.logits(&hidden)?;
                let mut parts = cache.split()?.into_iter();
                let mut rows = Vec::with_capacity(batched.len());
                for (j, &i) in batched.iter().enumerate() {
                    decoders[i].cache = parts
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("a batched cache split short"))?;
                    rows.push(logits.get(j)?.flatten_all()?);
                }
                Ok(rows)
            };
            match run() {
                Ok(rows) => {
                    for (&i, row) in batched.iter().zip(rows) {
                        out[i] = Some(decoders[i].advance(model, &row));
                    }
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    for &i in &batched {
                        out[i] = Some(Err(anyhow::anyhow!(msg.clone())));
                    }
                }
            }
        }
        decoders
            .iter_mut()
            .zip(out)
            .map(|(d, o)| o.unwrap_or_else(|| d.step(model)))
            .collect()
    }

    /// Samples the next token from `logits` `[vocab]` and updates the state. Special tokens
    /// other than an EOS are never sampled: generated text holds no control tokens.
    fn advance(&mut self, model: &BaseModel, logits: &Tensor) -> Result<bool> {
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
        if self.finish.is_none() && self.ids.len() >= self.params.max_new_tokens {
            self.finish = Some(FinishReason::Length);
        }
        if self.finish.is_none() {
            self.input = model.llama.embed_ids(&[next])?.unsqueeze(0)?;
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

/// Turns a generation's growing ids into text pieces as they become printable, for
/// streaming. Decoding re-reads only the last few ids (a window that starts at the previous
/// piece), so a stream costs O(n), and a character whose bytes span several tokens waits
/// for its last one (a partial character decodes to U+FFFD). With stop strings, the tail
/// that could still begin one is held back, so the pieces always add up to a prefix of the
/// final, cut text.
pub struct TextStream {
    prefix_offset: usize,
    read_offset: usize,
    text: String,
    sent: usize,
    hold_back: usize,
}

impl TextStream {
    pub fn new(params: &GenerationParams) -> Self {
        Self {
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            sent: 0,
            hold_back: params.stop.iter().map(String::len).max().unwrap_or(1) - 1,
        }
    }

    /// The text that became printable since the last call, if any.
    pub fn next(&mut self, model: &BaseModel, ids: &[u32]) -> Result<Option<String>> {
        let window = ids.get(self.prefix_offset..).unwrap_or_default();
        let seen = ids
            .get(self.prefix_offset..self.read_offset)
            .unwrap_or_default();
        let before = model.tokenizer.decode(seen, true)?;
        let now = model.tokenizer.decode(window, true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(new) = now.get(before.len()..) {
                self.text.push_str(new);
            }
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
        }
        let mut safe = self.text.len().saturating_sub(self.hold_back);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        Ok(self.take_to(safe))
    }

    /// What is left of the final text (the decoder's, cut at a stop string).
    pub fn finish(&mut self, final_text: &str) -> Option<String> {
        self.text = final_text.to_string();
        self.take_to(self.text.len())
    }

    fn take_to(&mut self, end: usize) -> Option<String> {
        let piece = self
            .text
            .get(self.sent..end)
            .filter(|p| !p.is_empty())?
            .to_string();
        self.sent = end;
        Some(piece)
    }
}
