//! Many generations decoded together over one persistent slot cache.

use std::collections::VecDeque;

use anyhow::{ensure, Result};
use candle_core::Tensor;

use super::super::kv::{KvCache, PrefixCache, PromptRows, SlotKv};
use super::super::llama::Mode;
use super::super::BaseModel;
use super::Decoder;

mod reuse;

/// Generations decoded together over a persistent slot cache ([`SlotKv`]): they queue to
/// be prefilled, in slices of a token budget (short prompts together in padded forwards,
/// long ones in chunks over their own cache), so that a long prompt never holds up the
/// decoding of the others or a server's small requests for long; then every step runs one
/// forward for all of them (keys and values written in place, never re-stacked), and each
/// leaves when it finishes or is dropped. Members are known by the caller's handles.
///
/// With a prefix cache ([`DecodeBatch::with_prefix_cache`]), a prompt that begins with the
/// rows of one prefilled before takes those positions' keys and values from it, and prompts
/// queued together that begin alike have their common part computed once.
pub struct DecodeBatch {
    kv: SlotKv,
    /// Slot `i`'s member (packed at the front like the slots): handle and decoder.
    members: Vec<(u64, Decoder)>,
    /// Generations waiting for their prompt to be prefilled, oldest first; the front one
    /// may be part-way through (its own cache holds what is done).
    prefilling: VecDeque<(u64, Decoder)>,
    prefixes: Option<PrefixCache>,
    /// Prompt positions taken from the prefix cache instead of computed, not yet taken.
    reused: u64,
}

/// Per handle: `Ok(None)` it decodes now, `Ok(Some(decoder))` it finished at its first
/// token (it comes back), `Err` its prefill failed.
pub type Joined = Vec<(u64, Result<Option<Decoder>>)>;

/// A chunk of a prompt this short would go through the quantized path meant for decoding
/// (`FrozenLinear`: two rows or fewer), and a prompt would then be computed differently in
/// chunks than whole: chunks are never cut this short.
const MIN_CHUNK: usize = 3;

/// A prompt position continued from a cache is not computed but copied (stacked with the
/// others', split, moved into a slot) and attended to: a slice's budget counts this many
/// of them as one computed token, so that prompts with long cached prefixes do not all go
/// into one slice (what a head request may wait behind). A rough figure: slices with
/// ~1,000 cached positions per prompt still ran 0.4-1.2 s at 16 and at 4 on two cores.
const CACHED_PER_TOKEN: usize = 16;

/// What continuing `d` costs a slice beyond its own tokens.
fn cached_cost(d: &Decoder) -> usize {
    d.prefilled.div_ceil(CACHED_PER_TOKEN)
}

impl DecodeBatch {
    pub fn new(model: &BaseModel) -> Self {
        Self {
            kv: SlotKv::new(model.config(), model.device()),
            members: Vec::new(),
            prefilling: VecDeque::new(),
            prefixes: None,
            reused: 0,
        }
    }

    /// Keeps prefilled prompts' keys and values, within `bytes`, for later prompts that
    /// begin alike (0: none kept).
    pub fn with_prefix_cache(mut self, bytes: usize) -> Self {
        self.prefixes = (bytes > 0).then(|| PrefixCache::new(bytes));
        self
    }

    /// Prompt positions taken from the prefix cache since the last call.
    pub fn take_reused(&mut self) -> u64 {
        std::mem::take(&mut self.reused)
    }

    /// Bytes the prefix cache holds.
    pub fn prefix_cache_bytes(&self) -> usize {
        self.prefixes.as_ref().map_or(0, PrefixCache::bytes)
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
        for (h, mut d) in joining {
            if self.prefixes.is_some() && d.prefilled == 0 {
                // Rows that cannot be read (never expected) only mean no reuse.
                d.rows = d
                    .prompt
                    .as_ref()
                    .and_then(|p| PromptRows::of(&p.squeeze(0).ok()?).ok());
            }
            self.prefilling.push_back((h, d));
        }
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
            let shared = self.reuse_prefixes(model, left);
            left = left.saturating_sub(shared);
            done += shared;
            let Some((_, front)) = self.prefilling.front() else {
                break;
            };
            let remaining = front.prompt_left();
            if remaining + cached_cost(front) <= left {
                // A run of prompts from the front, each done at once, that fits the budget
                // padded (a prompt part-way through, or found in part in the prefix cache,
                // continues its own cache).
                let room = max_members - self.members.len();
                let (mut k, mut longest, mut cached) = (0, 0, 0);
                for (_, d) in self.prefilling.iter().take(room) {
                    let l = longest.max(d.prompt_left());
                    let c = cached + cached_cost(d);
                    if (k + 1) * l + c > left {
                        break;
                    }
                    (k, longest, cached) = (k + 1, l, c);
                }
                let chunk: Vec<(u64, Decoder)> = self.prefilling.drain(..k).collect();
                left -= k * longest + cached;
                done += k * longest + cached;
                let handles: Vec<u64> = chunk.iter().map(|(h, _)| *h).collect();
                match self.prefill_whole(model, chunk, max_members) {
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
            let n_cost = n + cached_cost(front);
            left = left.saturating_sub(n_cost);
            done += n_cost;
            let Some((h, mut d)) = self.prefilling.pop_front() else {
                break;
            };
            match d.prefill_part(model, n) {
                Ok(None) => self.prefilling.push_front((h, d)),
                Ok(Some(logits)) => {
                    let joined = self
                        .make_room(&[d.cache.len() + d.steps_left()], max_members)
                        .and_then(|()| self.admit_prefilled(model, h, d, &logits));
                    out.push((h, joined));
                }
                Err(e) => out.push((h, Err(e))),
            }
        }
        (out, done)
    }

    /// A decoder whose prompt is in its own cache: samples its first token from `logits`
    /// and, unless that finished it, moves its cache into a slot (the caller made room,
    /// [`DecodeBatch::make_room`]).
    fn admit_prefilled(
        &mut self,
        model: &BaseModel,
        h: u64,
        mut dec: Decoder,
        logits: &Tensor,
    ) -> Result<Option<Decoder>> {
        if let (Some(prefixes), Some(rows)) = (self.prefixes.as_mut(), dec.rows.take()) {
            prefixes.insert(rows, &dec.cache);
        }
        if dec.advance(model, logits)? {
            return Ok(Some(dec));
        }
        let cache = std::mem::replace(&mut dec.cache, model.llama.new_cache());
        self.kv.push(&cache)?;
        self.members.push((h, dec));
        Ok(None)
    }

    /// Slot cache room, at once, for generations joining now (`joining`: the positions
    /// each will fill, to its last token) and those queued to join after them, while
    /// fewer than `max_members` decode: growing by doubling as each joins, or part-way
    /// through decoding, copies every slot each time (one such copy of 8 x 2,048
    /// positions took 249 ms here, and a head request waited behind it).
    fn make_room(&mut self, joining: &[usize], max_members: usize) -> Result<()> {
        let queued = self
            .prefilling
            .iter()
            .map(|(_, d)| d.prompt_len() + d.steps_left());
        let longest = queued
            .clone()
            .chain(joining.iter().copied())
            .max()
            .unwrap_or(0);
        let now = self.members.len() + joining.len();
        let slots = now + queued.count().min(max_members.saturating_sub(now));
        self.kv.reserve(slots, longest + 1)
    }

    /// One padded forward over the rest of the prompts of `chunk` (each continuing its own
    /// cache, where it has one); the unfinished join the slots.
    fn prefill_whole(
        &mut self,
        model: &BaseModel,
        chunk: Vec<(u64, Decoder)>,
        max_members: usize,
    ) -> Result<Joined> {
        let llama = &model.llama;
        let prompts: Vec<Tensor> = chunk
            .iter()
            .map(|(_, dec)| {
                let p = dec
                    .prompt
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("a decoder joined without its prompt"))?;
                Ok(p.squeeze(0)?.narrow(0, dec.prefilled, dec.prompt_left())?)
            })
            .collect::<Result<_>>()?;
        let (x, mask) = super::super::pad_right(&prompts)?;
        let mut cache = if chunk.iter().all(|(_, d)| d.cache.is_empty()) {
            llama.new_cache()
        } else {
            let empty = KvCache::empty_sequence(model.config().num_layers);
            let each: Vec<&KvCache> = chunk
                .iter()
                .map(|(_, d)| if d.cache.is_empty() { &empty } else { &d.cache })
                .collect();
            KvCache::stack(&each, model.config(), model.device())?
        };
        let hidden = llama.forward(&x, Some(&mask), Some(&mut cache), Mode::Fast)?;
        let lasts = prompts
            .iter()
            .map(|p| Ok(p.dim(0)? - 1))
            .collect::<Result<Vec<usize>>>()?;
        let logits = llama.logits(&super::super::rows_at(&hidden, &lasts)?)?;
        let caches = cache.split()?;
        let joining: Vec<usize> = caches
            .iter()
            .zip(&chunk)
            .map(|(c, (_, d))| c.len() + d.steps_left())
            .collect();
        self.make_room(&joining, max_members)?;
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
        if let Some(p) = self.prefixes.as_mut() {
            p.clear();
        }
        let waiting = self.prefilling.drain(..).map(|(h, _)| h);
        self.members
            .drain(..)
            .map(|(h, _)| h)
            .chain(waiting)
            .collect()
    }
}
