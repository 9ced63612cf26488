//! Admission: a request is let in when, given what the engine is doing and what is already
//! admitted, it would be answered (a head request) or get its first token (a generation)
//! within the queue budget. Anything else gets 429 at once, with the estimated wait.
//!
//! The engine is modelled as it runs (`engine::run`). Each iteration computes the head
//! sequences that came in, then one *slice* of generation prompts (at most
//! [`Admission::prefill_budget`] tokens, chunks of long prompts included), then one decoding
//! step for every generation whose prompt is done. So:
//! - a head request waits for the head work admitted before it, plus at most one slice and
//!   one step: a 20-token request is never queued behind seconds of someone's prefill;
//! - a generation waits for a decoding slot (at most `max_generations` decode together, and
//!   their keys and values must fit `kv_cache_bytes`), then for the prompts ahead of it,
//!   slice by slice, a decoding step after each;
//! - prefill runs at the measured prefill pace (tokens per second of forward passes), and a
//!   step of `n` sequences takes the measured time of such a step: a step of 16 is not 16
//!   steps of 1 (it costs ~2-3 times one on CPU).
//!
//! A request's size is known only once it is tokenised, and tokenising is compute. So a
//! request is first admitted on an estimate (its sequences times the typical load of a
//! sequence of its kind lately), which it holds while it is prepared, then settled at its
//! measured size. Work in preparation thus counts: a burst is refused before it is
//! tokenised. The ticket then travels with the work through the engine, which releases its
//! parts as they are done (heads computed, prompts prefilled); the rest goes when the
//! request is answered or abandoned.
//!
//! Here: the request side (admit, reserve, settle, and the model of the engine's queue
//! they are judged on); `measured.rs`: what the engine measured and reports (prefill and
//! step times, typical loads); `ticket.rs`: the load an admitted request holds.

mod measured;
#[cfg(test)]
mod tests;
mod ticket;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use measured::{PrefillTimes, StepTimes, Typical};
pub use ticket::Ticket;

/// Kinds of request whose typical load is kept (kinds are served functions, so this only
/// bounds memory); a kind past it is estimated by the typical load of any.
const MAX_KINDS: usize = 4096;
/// A slice's budget is never below this many tokens, so a slow pace still makes progress.
const MIN_PREFILL_BUDGET: usize = 32;

/// What a request asks of the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Prompt tokens of head sequences (answered by one forward each).
    pub head_tokens: u64,
    /// Prompt tokens of generations (prefilled in slices).
    pub prompt_tokens: u64,
    /// Generations: each holds a decoding slot until it ends.
    pub generations: u64,
    /// The longest generation's prompt plus `max_new_tokens`: what its slot must hold.
    pub longest: u64,
}

impl Load {
    fn tokens(&self) -> u64 {
        self.head_tokens + self.prompt_tokens
    }
}

/// How the engine is built, as far as admission must know.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// The longest estimated wait a new head request may face.
    pub max_wait: Duration,
    /// The longest estimated wait for a new generation's first token.
    pub max_first_token_wait: Duration,
    /// Generations decoding together at most (the decoding batch's slots).
    pub max_generations: usize,
    /// Bytes the slot cache's keys and values may take.
    pub kv_cache_bytes: usize,
    /// Bytes of keys and values per cached position of one sequence.
    pub kv_bytes_per_token: usize,
    /// The time one slice of prefill aims at (its token budget follows the pace).
    pub prefill_slice: Duration,
    /// The most padded tokens of one forward pass.
    pub max_batch_tokens: usize,
}

#[derive(Debug)]
struct State {
    /// Admitted and not yet done: head tokens to compute, prompt tokens to prefill,
    /// generations not ended.
    head_tokens: u64,
    prompt_tokens: u64,
    generations: u64,
    /// The `longest` of every admitted generation (a multiset): the slot cache is as wide
    /// as the longest of them.
    lengths: BTreeMap<u64, u64>,
    prefill: PrefillTimes,
    /// Tokens per second of the prefill slices lately: chunks deep into a long prompt
    /// attend over all of it, so they run slower than the fitted line says.
    slice_pace: Option<f64>,
    steps: StepTimes,
    /// Per generation decoding now: the steps it may still take, ascending.
    remaining: Vec<usize>,
    /// Requests admitted on an estimate and still being prepared (tokenised): they will
    /// reach the engine within milliseconds.
    preparing: u64,
    typical_by_kind: HashMap<String, Typical>,
    typical: Option<Typical>,
}

impl State {
    /// Prefill tokens per second, at the margin (the fixed part of a forward aside).
    fn pace(&self) -> f64 {
        self.prefill.fit().1
    }

    fn decoding(&self) -> usize {
        self.remaining.len()
    }

    fn is_idle(&self) -> bool {
        self.head_tokens == 0 && self.prompt_tokens == 0 && self.generations == 0
    }

    fn add(&mut self, load: &Load) {
        self.head_tokens += load.head_tokens;
        self.prompt_tokens += load.prompt_tokens;
        self.generations += load.generations;
        if load.generations > 0 {
            *self.lengths.entry(load.longest).or_insert(0) += load.generations;
        }
    }

    fn remove(&mut self, load: &Load) {
        self.head_tokens = self.head_tokens.saturating_sub(load.head_tokens);
        self.prompt_tokens = self.prompt_tokens.saturating_sub(load.prompt_tokens);
        self.generations = self.generations.saturating_sub(load.generations);
        if load.generations > 0 {
            if let Some(count) = self.lengths.get_mut(&load.longest) {
                *count = count.saturating_sub(load.generations);
                if *count == 0 {
                    self.lengths.remove(&load.longest);
                }
            }
        }
    }

    fn learn(&mut self, kind: &str, measured: Typical) {
        self.typical = Some(self.typical.map_or(measured, |t| t.towards(measured)));
        if let Some(t) = self.typical_by_kind.get_mut(kind) {
            *t = t.towards(measured);
        } else if self.typical_by_kind.len() < MAX_KINDS {
            self.typical_by_kind.insert(kind.to_string(), measured);
        }
    }
}

/// Shared between the request side (reserve, settle) and the engine thread (what it
/// measured, what it finished).
#[derive(Debug, Clone)]
pub struct Admission {
    state: Arc<Mutex<State>>,
    config: Arc<AdmissionConfig>,
}

/// Why a request was not admitted: the estimated wait, for the client's `Retry-After`.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub estimated_wait: Duration,
    pub reason: &'static str,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server is at capacity ({}; about {:.1} s until it could start this request); \
             retry later",
            self.reason,
            self.estimated_wait.as_secs_f64()
        )
    }
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                head_tokens: 0,
                prompt_tokens: 0,
                generations: 0,
                lengths: BTreeMap::new(),
                prefill: PrefillTimes::prior(),
                slice_pace: None,
                steps: StepTimes::default(),
                remaining: Vec::new(),
                preparing: 0,
                typical_by_kind: HashMap::new(),
                typical: None,
            })),
            config: Arc::new(config),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Measured prefill tokens per second of forward time, at the margin (what one more
    /// token in a forward costs; see `prefill_fixed_seconds` for the rest).
    pub fn pace(&self) -> f64 {
        self.lock().pace()
    }

    /// Measured seconds every prefill forward takes whatever its size.
    pub fn prefill_fixed_seconds(&self) -> f64 {
        self.lock().prefill.fit().0
    }

    /// Estimated seconds of one decoding step of `n` sequences.
    pub fn step_seconds(&self, n: usize) -> f64 {
        let s = self.lock();
        s.steps.time(n, s.pace())
    }

    /// What is admitted and not yet done.
    pub fn queued(&self) -> Load {
        let s = self.lock();
        Load {
            head_tokens: s.head_tokens,
            prompt_tokens: s.prompt_tokens,
            generations: s.generations,
            longest: s.lengths.keys().next_back().copied().unwrap_or(0),
        }
    }

    pub fn max_wait(&self) -> Duration {
        self.config.max_wait
    }

    /// Prompt tokens one slice of prefill may take: what a forward does in
    /// `prefill_slice`, by the measured times.
    pub fn prefill_budget(&self) -> usize {
        self.slice_tokens(&self.lock())
    }

    fn slice_tokens(&self, s: &State) -> usize {
        let secs = self.config.prefill_slice.as_secs_f64();
        let tokens = s
            .slice_pace
            .map_or_else(|| s.prefill.tokens_in(secs), |pace| pace * secs);
        (tokens as usize).clamp(MIN_PREFILL_BUDGET, self.config.max_batch_tokens.max(1))
    }

    /// Lets `load` in, or says how long it would wait.
    pub fn admit(&self, load: Load) -> Result<Ticket, Refused> {
        let mut s = self.lock();
        self.check(&s, &load)?;
        s.add(&load);
        Ok(Ticket {
            state: self.state.clone(),
            load,
            kind: String::new(),
            preparing: false,
        })
    }

    /// Requests admitted on an estimate and still being prepared.
    pub fn preparing(&self) -> u64 {
        self.lock().preparing
    }

    /// Lets a request of `kind` with `sequences` in on an estimate of its load (the typical
    /// load of a sequence of its kind lately, else head work of any kind's typical size,
    /// else one head token), to
    /// hold while it is prepared, or says how long it would wait.
    pub fn reserve(&self, kind: &str, sequences: u64) -> Result<Ticket, Refused> {
        let estimate = {
            let s = self.lock();
            match (s.typical_by_kind.get(kind), s.typical) {
                (Some(t), _) => t.times(sequences),
                // A kind not seen yet is estimated as head work of any kind's typical
                // size: as a generation, one unknown head request sent while generations
                // run would be judged on their first-token wait (it is checked as one at
                // settlement if it is one).
                (None, Some(t)) => Load {
                    head_tokens: ((t.head_tokens + t.prompt_tokens) * sequences as f64).ceil()
                        as u64,
                    ..Load::default()
                },
                (None, None) => Load {
                    head_tokens: sequences,
                    ..Load::default()
                },
            }
        };
        let mut ticket = self.admit(estimate)?;
        ticket.kind = kind.to_string();
        ticket.preparing = true;
        self.lock().preparing += 1;
        Ok(ticket)
    }

    /// Replaces a reservation with the prepared request's measured `load` (of `sequences`).
    /// Within twice its reserved tokens, and with no more generations than reserved, a
    /// request keeps its place whatever else was admitted meanwhile (the estimate is a
    /// typical size, not a bound, and refusing it now would waste its preparation); a
    /// larger one must fit as a new one would.
    pub fn settle(
        &self,
        mut reservation: Ticket,
        load: Load,
        sequences: u64,
    ) -> Result<Ticket, Refused> {
        let mut s = self.lock();
        let reserved = std::mem::take(&mut reservation.load);
        s.remove(&reserved);
        if std::mem::take(&mut reservation.preparing) {
            s.preparing = s.preparing.saturating_sub(1);
        }
        if sequences > 0 {
            s.learn(&reservation.kind, Typical::of(&load, sequences));
        }
        let grew = load.tokens() > reserved.tokens().saturating_mul(2)
            || load.generations > reserved.generations;
        if grew {
            self.check(&s, &load)?;
        }
        s.add(&load);
        reservation.load = load;
        Ok(reservation)
    }

    /// Whether `load` may join what `s` holds: `Err` with the estimated wait if not.
    fn check(&self, s: &State, load: &Load) -> Result<(), Refused> {
        // An idle engine takes any one request, however large, so nothing within the
        // request limits is refused forever.
        if s.is_idle() {
            return Ok(());
        }
        let max_wait = self.config.max_wait.as_secs_f64();
        let refuse = |wait: f64, reason: &'static str| Refused {
            estimated_wait: Duration::from_secs_f64(wait.clamp(0.0, 3600.0)),
            reason,
        };
        let pace = s.pace().max(1e-9);
        let decoding = s.decoding();
        let step = s.steps.time(decoding, pace);
        let per_forward = self.config.max_batch_tokens;
        let prefill = |tokens: u64| s.prefill.time(tokens as f64, per_forward);
        let slice = self.slice_tokens(s) as u64;
        if load.head_tokens > 0 {
            // The heads admitted before it are computed with it, in the next iteration's
            // forwards; before that, at most one slice and one step of the iteration under
            // way. With none ahead it is let in, whatever its size.
            let wait = prefill(s.head_tokens + load.head_tokens)
                + prefill(s.prompt_tokens.min(slice))
                + step;
            if s.head_tokens > 0 && wait > max_wait {
                return Err(refuse(wait, "head requests queued"));
            }
        }
        if load.generations > 0 {
            let max_first_token = self.config.max_first_token_wait.as_secs_f64();
            let generations = s.generations + load.generations;
            // A slot: past the limit, it waits for the k-th soonest to end.
            let over = generations.saturating_sub(self.config.max_generations as u64) as usize;
            let slot_wait = match over {
                0 => 0.0,
                k => s
                    .remaining
                    .get(k - 1)
                    .map_or(f64::INFINITY, |&left| left as f64 * step),
            };
            let slot_wait = if slot_wait > max_first_token {
                f64::INFINITY
            } else {
                slot_wait
            };
            let soonest = s.remaining.first().map_or(max_wait, |&l| l as f64 * step);
            if !slot_wait.is_finite() {
                return Err(refuse(soonest, "every decoding slot is taken"));
            }
            // The slot cache is as wide as its longest sequence, in both dimensions
            // grown by doubling (`SlotKv::reserve`).
            let longest = s.lengths.keys().next_back().copied().unwrap_or(0);
            let longest = longest.max(load.longest) as usize;
            let slots = (generations as usize).next_power_of_two().max(4);
            let kv = slots
                .saturating_mul(longest.next_power_of_two().max(128))
                .saturating_mul(self.config.kv_bytes_per_token);
            if kv > self.config.kv_cache_bytes && s.generations > 0 {
                return Err(refuse(soonest, "the decoding cache is full"));
            }
            // First token: its slot, the heads ahead, then the prompts ahead and its own in
            // slices, a decoding step after each.
            let prompts = s.prompt_tokens + load.prompt_tokens;
            let slices = prompts.div_ceil(slice.max(1)).max(1);
            let ttft = slot_wait
                + prefill(s.head_tokens + load.head_tokens)
                + prefill(prompts).max(slices as f64 * prefill(slice.min(prompts)))
                + slices as f64 * step;
            if ttft > max_first_token {
                return Err(refuse(ttft, "generations queued"));
            }
        }
        Ok(())
    }
}
