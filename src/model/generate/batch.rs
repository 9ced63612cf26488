//! Many generations decoded together over one persistent slot cache.

use std::collections::VecDeque;

use anyhow::{ensure, Result};
use candle_core::Tensor;

use super::super::kv::SlotKv;
use super::super::llama::Mode;
use super::super::BaseModel;
use super::Decoder;

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
        let (x, mask) = super::super::pad_right(&prompts)?;
        let mut cache = llama.new_cache();
        let hidden = llama.forward(&x, Some(&mask), Some(&mut cache), Mode::Fast)?;
        let lasts = prompts
            .iter()
            .map(|p| Ok(p.dim(0)? - 1))
            .collect::<Result<Vec<usize>>>()?;
        let logits = llama.logits(&super::super::rows_at(&hidden, &lasts)?)?;
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
