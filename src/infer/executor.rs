//! The engine's executor: the forward passes. Head sequences of a batch of requests share
//! padded forwards (or one computed prefix); generations queue in one `DecodeBatch`, are
//! prefilled a slice at a time, and advance a token per step, all of them in one forward
//! over the slot cache.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::Result;

use super::heads::{padded_heads, shared_prefix_heads, Prediction};
use super::scheduler::{Flights, Work};
use super::work::{EngineConfig, TextPieces};
use crate::model::{BaseModel, DecodeBatch, Decoder, TextStream};
use crate::tags::compose::{common_prefix, Composed};

/// What a panic in a kernel becomes: the requests it touched fail, the engine goes on.
const INTERNAL: &str = "internal error in the inference engine";

/// Where a generation's answer goes; its decoder lives in the `DecodeBatch` under the
/// same handle.
struct ActiveGeneration {
    flight: u64,
    group: usize,
    seq: usize,
    /// Its prompt's tokens, released from admission once prefilled.
    prompt_tokens: u64,
    /// A streamed generation: its decoded text so far, and where its pieces go (taken
    /// from the work, so the stream ends when the generation does).
    stream: Option<(TextStream, TextPieces)>,
}

/// Every generation being prefilled or decoded.
pub(super) struct Generations {
    batch: DecodeBatch,
    active: HashMap<u64, ActiveGeneration>,
    next_handle: u64,
}

impl Generations {
    pub fn new(model: &BaseModel, prefix_cache_bytes: usize) -> Self {
        Self {
            batch: DecodeBatch::new(model).with_prefix_cache(prefix_cache_bytes),
            active: HashMap::new(),
            next_handle: 0,
        }
    }

    /// Generations decoding (their prompts done).
    pub fn decoding(&self) -> usize {
        self.batch.len()
    }

    /// Nothing decoding and nothing waiting for its prefill.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Steps each decoding generation may still take.
    pub fn steps_left(&self) -> Vec<usize> {
        self.batch.steps_left()
    }

    pub fn cache_bytes(&self) -> usize {
        self.batch.cache_bytes()
    }

    /// Prompt positions taken from the prefix cache since the last call, and the bytes
    /// it holds.
    pub fn prefix_reuse(&mut self) -> (u64, usize) {
        (self.batch.take_reused(), self.batch.prefix_cache_bytes())
    }

    /// Sets up a decoder for every generation of `work` (request `flight`) and queues it to
    /// be prefilled. Returns how many, or the error that fails the request.
    pub fn start(
        &mut self,
        model: &BaseModel,
        flight: u64,
        work: &mut Work,
    ) -> std::result::Result<usize, String> {
        let mut open = 0;
        for (gi, g) in work.groups.iter().enumerate() {
            for (si, seq) in g.seqs.iter().enumerate().filter(|(_, s)| s.head.is_none()) {
                let decoder = seq
                    .embed(model, 0)
                    .and_then(|e| Decoder::new(model, &e, &work.params))
                    .map_err(|e| format!("{e:#}"))?;
                let handle = self.next_handle;
                self.next_handle += 1;
                let stream = work
                    .stream
                    .take()
                    .map(|tx| (TextStream::new(&work.params), tx));
                self.active.insert(
                    handle,
                    ActiveGeneration {
                        flight,
                        group: gi,
                        seq: si,
                        prompt_tokens: decoder.prompt_len() as u64,
                        stream,
                    },
                );
                self.batch.enqueue(vec![(handle, decoder)]);
                open += 1;
            }
        }
        Ok(open)
    }

    /// One slice of prefill (at most `budget` padded tokens, while fewer than
    /// `max_members` decode): generations whose prompt is done join the decoding batch
    /// (with their first token), and their prompt is released from admission. Returns the
    /// padded tokens prefilled.
    pub fn prefill(
        &mut self,
        model: &BaseModel,
        budget: usize,
        max_members: usize,
        flights: &mut Flights,
    ) -> usize {
        let batch = &mut self.batch;
        let (joined, tokens) = catch_unwind(AssertUnwindSafe(|| {
            batch.prefill(model, budget, max_members)
        }))
        .unwrap_or_else(|_| {
            // A panic part-way leaves the queue suspect: everything in it fails, and the
            // slice counts as no prefill (its time says nothing of the pace).
            let joined = batch
                .clear()
                .into_iter()
                .map(|h| (h, Err(anyhow::anyhow!(INTERNAL))))
                .collect();
            (joined, 0)
        });
        for (handle, result) in joined {
            if let Some(g) = self.active.get(&handle) {
                if let Some(f) = flights.get_mut(g.flight) {
                    f.work.ticket.prompt_done(g.prompt_tokens);
                }
            }
            match result {
                Ok(None) => {}
                Ok(Some(done)) => self.answer(model, flights, handle, done),
                Err(e) => self.fail(flights, handle, format!("{e:#}")),
            }
        }
        tokens
    }

    /// Generations whose request failed or whose client left stop here.
    pub fn drop_unwanted(&mut self, flights: &mut Flights) {
        let unwanted: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, g)| !flights.wanted(g.flight))
            .map(|(h, _)| *h)
            .collect();
        for h in unwanted {
            self.active.remove(&h);
            if let Err(e) = self.batch.leave(h) {
                tracing::error!("leaving the decoding batch: {e:#}");
                self.fail_all(flights, &format!("{e:#}"));
            }
        }
    }

    /// One token for every generation, in one batched forward; finished ones are
    /// answered, streamed ones send their new text.
    pub fn step(&mut self, model: &BaseModel, flights: &mut Flights) {
        let batch = &mut self.batch;
        let stepped = catch_unwind(AssertUnwindSafe(|| batch.step(model)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!(INTERNAL)));
        let results = match stepped {
            Ok(results) => results,
            // A failed step leaves every slot suspect: all its generations fail.
            Err(e) => return self.fail_all(flights, &format!("{e:#}")),
        };
        for (handle, finished) in results {
            if finished {
                match self.batch.leave(handle) {
                    Ok(Some(done)) => self.answer(model, flights, handle, done),
                    Ok(None) => {}
                    Err(e) => self.fail(flights, handle, format!("{e:#}")),
                }
                continue;
            }
            let (Some(g), Some(d)) = (self.active.get_mut(&handle), self.batch.get(handle)) else {
                continue;
            };
            if let Some((text, tx)) = &mut g.stream {
                match text.next(model, d.ids()) {
                    Ok(Some(piece)) => {
                        let _ = tx.send(piece);
                    }
                    Ok(None) => {}
                    Err(e) => flights.fail(g.flight, format!("{e:#}")),
                }
            }
        }
    }

    /// Stops the generations of request `flight` (answered or abandoned).
    pub fn forget(&mut self, flight: u64) {
        let batch = &mut self.batch;
        self.active.retain(|h, g| {
            let gone = g.flight == flight;
            if gone {
                let _ = batch.leave(*h);
            }
            !gone
        });
    }

    /// A finished generation's text into its request's answer (and the last piece of its
    /// stream).
    fn answer(&mut self, model: &BaseModel, flights: &mut Flights, handle: u64, done: Decoder) {
        let Some(mut g) = self.active.remove(&handle) else {
            return;
        };
        let Some(flight) = flights.get_mut(g.flight) else {
            return;
        };
        match done.finish(model) {
            Ok(out) => {
                if let Some((text, tx)) = &mut g.stream {
                    if let Some(piece) = text.finish(&out.text) {
                        let _ = tx.send(piece);
                    }
                }
                flight.preds[g.group][g.seq] = Some(Prediction::Text {
                    text: out.text,
                    ids: out.ids,
                    finish_reason: out.finish_reason,
                });
                flight.open_generations -= 1;
            }
            Err(e) => flight.failure = Some(format!("{e:#}")),
        }
    }

    /// A generation failed: so does its request.
    fn fail(&mut self, flights: &mut Flights, handle: u64, why: String) {
        if let Some(g) = self.active.remove(&handle) {
            flights.fail(g.flight, why);
        }
    }

    /// Every generation fails (the slot cache can no longer be trusted) and the batch is
    /// emptied.
    fn fail_all(&mut self, flights: &mut Flights, why: &str) {
        for h in self.batch.clear() {
            self.fail(flights, h, why.to_string());
        }
    }
}

/// Head predictions of every work item (generation slots stay empty), or the error that
/// fails it; a panic deep in a kernel fails these requests, not the engine.
pub(super) fn heads(
    model: &BaseModel,
    cfg: &EngineConfig,
    batch: &[Work],
) -> Vec<std::result::Result<Vec<Vec<Option<Prediction>>>, String>> {
    match catch_unwind(AssertUnwindSafe(|| run_heads(model, cfg, batch))) {
        Ok(results) => results
            .into_iter()
            .map(|r| r.map_err(|e| format!("{e:#}")))
            .collect(),
        Err(_) => batch.iter().map(|_| Err(INTERNAL.to_string())).collect(),
    }
}

/// Head predictions of every work item (generation slots stay empty). Groups with a long
/// common prefix go through the prefix path; the rest are packed into padded forwards.
fn run_heads(
    model: &BaseModel,
    cfg: &EngineConfig,
    batch: &[Work],
) -> Vec<Result<Vec<Vec<Option<Prediction>>>>> {
    let mut out: Vec<Vec<Vec<Option<Prediction>>>> = batch
        .iter()
        .map(|w| w.groups.iter().map(|g| vec![None; g.seqs.len()]).collect())
        .collect();
    let mut plain: Vec<(usize, usize, usize)> = Vec::new();
    let mut failures: Vec<Option<anyhow::Error>> = batch.iter().map(|_| None).collect();
    for (wi, w) in batch.iter().enumerate() {
        for (gi, g) in w.groups.iter().enumerate() {
            let heads: Vec<usize> = (0..g.seqs.len())
                .filter(|&i| g.seqs[i].head.is_some())
                .collect();
            let seqs: Vec<&Composed> = heads.iter().map(|&i| &g.seqs[i]).collect();
            let shared = if seqs.len() >= 2 {
                let first_read = seqs
                    .iter()
                    .filter_map(|s| s.head_reads().map(|r| r.start))
                    .min()
                    .unwrap_or(0);
                common_prefix(&seqs).min(first_read)
            } else {
                0
            };
            if shared >= cfg.min_shared_prefix {
                match shared_prefix_heads(model, &seqs, shared) {
                    Ok(preds) => heads
                        .iter()
                        .zip(preds)
                        .for_each(|(&i, p)| out[wi][gi][i] = Some(p)),
                    Err(e) => failures[wi] = Some(e),
                }
            } else {
                plain.extend(heads.iter().map(|&i| (wi, gi, i)));
            }
        }
    }
    // Pack the plain head sequences into forwards within the token budget.
    let mut start = 0;
    while start < plain.len() {
        let mut end = start + 1;
        let mut longest = batch_seq(batch, plain[start]).len();
        while end < plain.len() {
            let l = longest.max(batch_seq(batch, plain[end]).len());
            if l * (end - start + 1) > cfg.max_batch_tokens {
                break;
            }
            longest = l;
            end += 1;
        }
        let seqs: Vec<&Composed> = plain[start..end]
            .iter()
            .map(|&k| batch_seq(batch, k))
            .collect();
        match padded_heads(model, &seqs) {
            Ok(preds) => {
                for (&(wi, gi, si), p) in plain[start..end].iter().zip(preds) {
                    out[wi][gi][si] = Some(p);
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                for &(wi, _, _) in &plain[start..end] {
                    failures[wi] = Some(anyhow::anyhow!(msg.clone()));
                }
            }
        }
        start = end;
    }
    out.into_iter()
        .zip(failures)
        .map(|(groups, failure)| match failure {
            Some(e) => Err(e),
            None => Ok(groups),
        })
        .collect()
}

fn batch_seq(batch: &[Work], (wi, gi, si): (usize, usize, usize)) -> &Composed {
    &batch[wi].groups[gi].seqs[si]
}
