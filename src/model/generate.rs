//! Autoregressive decoding from input embeddings. Sampling is candle-transformers'
//! `LogitsProcessor` (greedy at temperature 0). A `Decoder` is one generation; alone it
//! advances one token per `step` over its own KV cache (`generate` runs one to the end);
//! a server decodes many together in a `DecodeBatch`, over one persistent slot cache.

use std::collections::VecDeque;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::Serialize;

use super::kv::KvCache;
use super::kv::SlotKv;
use super::llama::Mode;
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
    params: GenerationParams,
    cache: KvCache,
    sampler: LogitsProcessor,
    ids: Vec<u32>,
    /// The prompt, until a step (or a batch's prefill) has run it.
    prompt: Option<Tensor>,
    /// Prompt positions already in `cache` (a prompt prefilled in chunks).
    prefilled: usize,
    text: String,
    finish: Option<FinishReason>,
    /// Ids to re-decode when looking for a stop string that the newest id may complete:
    /// enough to hold the longest one, plus a character's worth of partial bytes.
    stop_window: usize,
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
    fn prefill_part(&mut self, model: &BaseModel, n: usize) -> Result<Option<Tensor>> {
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
    fn next_input(&self, model: &BaseModel) -> Result<Tensor> {
        let last = *self
            .ids
            .last()
            .ok_or_else(|| anyhow::anyhow!("no token sampled yet"))?;
        Ok(model.llama.embed_ids(&[last])?.unsqueeze(0)?)
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

/// Generations decoded together over a persistent slot cache ([`SlotKv`]): they queue to
/// be prefilled, in slices of a token budget (short prompts together in padded forwards,
/// long ones in chunks over their own cache), so that a long prompt never holds up the
/// decoding of the others or a server's small requests for long; then every step runs one
/// forward for all of them (keys and values written in place, never re-stacked), and each
/// leaves when it finishes or is dropped. Members are known by the caller's handles.
pub struct DecodeBatch {
    kv: SlotKv,
    /// Slot `i`'s member (packed at the front like the slots): handle and decoder.
    members: Vec<(u64, Decoder)>,
    /// Generations waiting for their prompt to be prefilled, oldest first; the front one
    /// may be part-way through (its own cache holds what is done).
    prefilling: VecDeque<(u64, Decoder)>,
}

/// Per handle: `Ok(None)` it decodes now, `Ok(Some(decoder))` it finished at its first
/// token (it comes back), `Err` its prefill failed.
pub type Joined = Vec<(u64, Result<Option<Decoder>>)>;

/// A chunk of a prompt this short would go through the quantized path meant for decoding
/// (`FrozenLinear`: two rows or fewer), and a prompt would then be computed differently in
/// chunks than whole: chunks are never cut this short.
const MIN_CHUNK: usize = 3;

impl DecodeBatch {
    pub fn new(model: &BaseModel) -> Self {
        Self {
            kv: SlotKv::new(model.config(), model.device()),
            members: Vec::new(),
            prefilling: VecDeque::new(),
        }
    }

    /// Generations decoding.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Nothing decoding and nothing to prefill.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.prefilling.is_empty()
    }

    /// Generations waiting for (or part-way through) their prefill.
    pub fn prefilling(&self) -> usize {
        self.prefilling.len()
    }

    /// Bytes held by the slot cache.
    pub fn cache_bytes(&self) -> usize {
        self.kv.bytes()
    }

    pub fn get(&self, handle: u64) -> Option<&Decoder> {
        self.members
            .iter()
            .find(|(h, _)| *h == handle)
            .map(|(_, d)| d)
    }

    /// Steps each decoding member may still take.
    pub fn steps_left(&self) -> Vec<usize> {
        self.members.iter().map(|(_, d)| d.steps_left()).collect()
    }

    /// Queues generations to be prefilled by [`DecodeBatch::prefill`].
    pub fn enqueue(&mut self, joining: Vec<(u64, Decoder)>) {
        self.prefilling.extend(joining);
    }

    /// Prefills everything queued (in slices of `max_tokens`) and returns what joined.
    pub fn join(
        &mut self,
        model: &BaseModel,
        joining: Vec<(u64, Decoder)>,
        max_tokens: usize,
    ) -> Joined {
        self.enqueue(joining);
        let mut out = Vec::new();
        while !self.prefilling.is_empty() {
            out.extend(self.prefill(model, max_tokens, usize::MAX).0);
        }
        out
    }

    /// One slice of prefill: at most `budget` padded prompt tokens, oldest first, while
    /// fewer than `max_members` decode. Whole prompts that fit go together in padded
    /// forwards; the first that does not is prefilled in chunks, one per slice. Each
    /// finished prompt's first token is sampled and it joins the slots. Returns what
    /// joined, and the padded tokens the slice's forwards took.
    pub fn prefill(
        &mut self,
        model: &BaseModel,
        budget: usize,
        max_members: usize,
    ) -> (Joined, usize) {
        let mut out = Vec::new();
        let mut left = budget.max(MIN_CHUNK);
        let mut done = 0;
        while left > 0 && self.members.len() < max_members {
            let Some((_, front)) = self.prefilling.front() else {
                break;
            };
            let remaining = front.prompt_left();
            if front.prefilled == 0 && remaining <= left {
                // A run of whole prompts from the front that fits the budget padded.
                let room = max_members - self.members.len();
                let (mut k, mut longest) = (0, 0);
                for (_, d) in self.prefilling.iter().take(room) {
                    let l = longest.max(d.prompt_left());
                    if d.prefilled != 0 || (k + 1) * l > left {
                        break;
                    }
                    (k, longest) = (k + 1, l);
                }
                let chunk: Vec<(u64, Decoder)> = self.prefilling.drain(..k).collect();
                left -= k * longest;
                done += k * longest;
                let handles: Vec<u64> = chunk.iter().map(|(h, _)| *h).collect();
                match self.prefill_whole(model, chunk) {
                    Ok(results) => out.extend(results),
                    Err(e) => {
                        let msg = format!("{e:#}");
                        out.extend(
                            handles
                                .into_iter()
                                .map(|h| (h, Err(anyhow::anyhow!(msg.clone())))),
                        );
                    }
                }
                continue;
            }
            // A chunk of the front prompt. A tail too short is taken now (a few tokens over
            // the budget); a chunk too short waits for the next slice.
            let mut n = remaining.min(left);
            if remaining - n < MIN_CHUNK {
                n = remaining;
            } else if n < MIN_CHUNK {
                if done > 0 {
                    break;
                }
                n = MIN_CHUNK;
            }
            left = left.saturating_sub(n);
            done += n;
            let Some((h, mut d)) = self.prefilling.pop_front() else {
                break;
            };
            match d.prefill_part(model, n) {
                Ok(None) => self.prefilling.push_front((h, d)),
                Ok(Some(logits)) => {
                    let joined = self.admit_prefilled(model, h, d, &logits);
                    out.push((h, joined));
                }
                Err(e) => out.push((h, Err(e))),
            }
        }
        (out, done)
    }

    /// A decoder whose prompt is in its own cache: samples its first token from `logits`
    /// and, unless that finished it, moves its cache into a slot.
    fn admit_prefilled(
        &mut self,
        model: &BaseModel,
        h: u64,
        mut dec: Decoder,
        logits: &Tensor,
    ) -> Result<Option<Decoder>> {
        if dec.advance(model, logits)? {
            return Ok(Some(dec));
        }
        let cache = std::mem::replace(&mut dec.cache, model.llama.new_cache());
        self.kv.push(&cache)?;
        self.members.push((h, dec));
        Ok(None)
    }

    /// One padded forward over the whole prompts of `chunk`; the unfinished join the slots.
    fn prefill_whole(&mut self, model: &BaseModel, chunk: Vec<(u64, Decoder)>) -> Result<Joined> {
        let llama = &model.llama;
        let prompts: Vec<Tensor> = chunk
            .iter()
            .map(|(_, dec)| {
                dec.prompt
                    .as_ref()
                    .map(|p| p.squeeze(0))
                    .transpose()?
                    .ok_or_else(|| anyhow::anyhow!("a decoder joined without its prompt"))
            })
            .collect::<Result<_>>()?;
        let (x, mask) = super::pad_right(&prompts)?;
        let mut cache = llama.new_cache();
        let hidden = llama.forward(&x, Some(&mask), Some(&mut cache), Mode::Fast)?;
        let lasts = prompts
            .iter()
            .map(|p| Ok(p.dim(0)? - 1))
            .collect::<Result<Vec<usize>>>()?;
        let logits = llama.logits(&super::rows_at(&hidden, &lasts)?)?;
        let caches = cache.split()?;
        let mut out = Vec::with_capacity(chunk.len());
        for ((i, (h, mut dec)), c) in chunk.into_iter().enumerate().zip(caches) {
            dec.prompt = None;
            dec.cache = c;
            let joined = logits
                .get(i)
                .map_err(anyhow::Error::from)
                .and_then(|l| self.admit_prefilled(model, h, dec, &l));
            out.push((h, joined));
        }
        Ok(out)
    }

    /// One token for every member, in one batched forward over the slots. Returns, per
    /// handle, whether it finished; finished members stay until [`DecodeBatch::leave`].
    /// An error fails every member of the step.
    pub fn step(&mut self, model: &BaseModel) -> Result<Vec<(u64, bool)>> {
        ensure!(
            self.members.iter().all(|(_, d)| !d.is_finished()),
            "finished generations must leave before the next step"
        );
        if self.members.is_empty() {
            return Ok(Vec::new());
        }
        let last: Vec<u32> = self
            .members
            .iter()
            .map(|(_, d)| d.ids.last().copied())
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow::anyhow!("a member has no sampled token"))?;
        let x = model.llama.embed_ids(&last)?.unsqueeze(1)?;
        let hidden = model.llama.decode_slots(&x, &mut self.kv)?;
        let logits = model.llama.logits(&hidden)?;
        let mut out = Vec::with_capacity(self.members.len());
        for (i, (h, d)) in self.members.iter_mut().enumerate() {
            let finished = d.advance(model, &logits.get(i)?.flatten_all()?)?;
            out.push((*h, finished));
        }
        Ok(out)
    }

    /// Removes a member (finished, failed or abandoned), or a generation still waiting
    /// for its prefill, and returns its decoder.
    pub fn leave(&mut self, handle: u64) -> Result<Option<Decoder>> {
        if let Some(i) = self.prefilling.iter().position(|(h, _)| *h == handle) {
            return Ok(self.prefilling.remove(i).map(|(_, d)| d));
        }
        let Some(i) = self.members.iter().position(|(h, _)| *h == handle) else {
            return Ok(None);
        };
        self.kv.swap_remove(i)?;
        let (_, decoder) = self.members.swap_remove(i);
        if self.members.is_empty() {
            // An idle engine holds no cache memory (a burst's can be large).
            self.kv.clear();
        }
        Ok(Some(decoder))
    }

    /// Removes every member and every generation waiting for its prefill (after a failed
    /// step: their caches are suspect).
    pub fn clear(&mut self) -> Vec<u64> {
        self.kv.clear();
        let waiting = self.prefilling.drain(..).map(|(h, _)| h);
        self.members
            .drain(..)
            .map(|(h, _)| h)
            .chain(waiting)
            .collect()
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
