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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The prefill pace assumed before anything was measured. The engine measures its own
/// before it serves.
const PRIOR_TOKENS_PER_SECOND: f64 = 2000.0;
/// How much each older prefill measurement still weighs after a new one (about the last
/// 50 forwards count).
const PREFILL_KEEP: f64 = 0.98;
/// Weight of each new measurement of a step time, and of each settled request in the
/// typical load of a sequence.
const STEP_WEIGHT: f64 = 0.2;
const TYPICAL_WEIGHT: f64 = 0.1;
/// Weight of each slice's pace in the pace slices are sized by.
const SLICE_WEIGHT: f64 = 0.3;
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

/// Step times by number of sequences: an average per size measured, interpolated between
/// sizes (and extrapolated along the last two) where none was.
#[derive(Debug, Default)]
struct StepTimes(BTreeMap<usize, f64>);

impl StepTimes {
    /// A step of `n` took `secs`: the estimate for `n` moves towards it (the first
    /// measurement of a size is taken as it is).
    fn record(&mut self, n: usize, secs: f64) {
        self.0
            .entry(n)
            .and_modify(|t| *t += STEP_WEIGHT * (secs - *t))
            .or_insert(secs);
    }

    /// Seconds of one step of `n` sequences (0 for none).
    fn time(&self, n: usize, prefill_pace: f64) -> f64 {
        if n == 0 {
            return 0.0;
        }
        if let Some(t) = self.0.get(&n) {
            return *t;
        }
        let below = self.0.range(..n).next_back();
        let above = self.0.range(n..).next();
        let line = |(n0, t0): (&usize, &f64), (n1, t1): (&usize, &f64)| {
            let slope = ((t1 - t0) / (*n1 as f64 - *n0 as f64)).max(0.0);
            (t0 + slope * (n as f64 - *n0 as f64)).max(0.0)
        };
        match (below, above) {
            (Some(b), Some(a)) => line(b, a),
            (Some(b), None) => match self.0.range(..*b.0).next_back() {
                Some(b0) => line(b0, b),
                None => *b.1 * n as f64 / *b.0 as f64,
            },
            (None, Some(a)) => match self.0.range(a.0 + 1..).next() {
                Some(a1) => line(a, a1).min(*a.1),
                None => *a.1,
            },
            // Nothing measured: a step costs what prefilling its tokens would (pessimistic).
            (None, None) => n as f64 / prefill_pace,
        }
    }
}

/// Seconds of a prefill forward of `t` padded tokens, fitted as `fixed + t / pace` over the
/// forwards measured lately: on a CPU every forward reads every weight once, whatever its
/// batch (~0.1 s for the default model's f32 weights on two cores), so ten one-input
/// requests in one forward cost far less than ten forwards, and a pace measured on small
/// forwards alone would make batches look slow (under a storm of one-input requests the
/// engine's measured pace fell by half, and admission refused more and more).
#[derive(Debug, Default)]
struct PrefillTimes {
    /// Decayed weighted sums for the least-squares line: weight, x, y, x², xy.
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl PrefillTimes {
    /// The prior pace, until the engine has measured its own.
    fn prior() -> Self {
        let mut p = Self::default();
        p.record(PRIOR_TOKENS_PER_SECOND, 1.0);
        p
    }

    fn record(&mut self, tokens: f64, secs: f64) {
        let keep = PREFILL_KEEP;
        self.w = self.w * keep + 1.0;
        self.x = self.x * keep + tokens;
        self.y = self.y * keep + secs;
        self.xx = self.xx * keep + tokens * tokens;
        self.xy = self.xy * keep + tokens * secs;
    }

    /// `(fixed seconds, tokens per second)` of the fitted line; with forwards all of one
    /// size (or a line that makes no sense) no fixed part, the mean pace.
    fn fit(&self) -> (f64, f64) {
        let mean_pace = self.x / self.y.max(1e-12);
        let det = self.w * self.xx - self.x * self.x;
        // Sizes must spread (relative to their magnitude) for a slope to mean anything.
        if det <= 1e-6 * self.w * self.xx {
            return (0.0, mean_pace);
        }
        let slope = (self.w * self.xy - self.x * self.y) / det;
        let fixed = (self.y - slope * self.x) / self.w;
        if slope <= 0.0 || fixed < 0.0 {
            return (0.0, mean_pace);
        }
        (fixed, 1.0 / slope)
    }

    /// Seconds to prefill `tokens` in forwards of at most `per_forward` tokens each.
    fn time(&self, tokens: f64, per_forward: usize) -> f64 {
        if tokens <= 0.0 {
            return 0.0;
        }
        let (fixed, pace) = self.fit();
        let forwards = (tokens / per_forward.max(1) as f64).ceil();
        forwards * fixed + tokens / pace
    }

    /// The most tokens one forward prefills in `secs` (at least one token).
    fn tokens_in(&self, secs: f64) -> f64 {
        let (fixed, pace) = self.fit();
        ((secs - fixed) * pace).max(1.0)
    }
}

/// The typical load of one sequence of a kind of request.
#[derive(Debug, Clone, Copy)]
struct Typical {
    head_tokens: f64,
    prompt_tokens: f64,
    generations: f64,
    longest: f64,
}

impl Typical {
    fn of(load: &Load, sequences: u64) -> Self {
        let n = sequences.max(1) as f64;
        Self {
            head_tokens: load.head_tokens as f64 / n,
            prompt_tokens: load.prompt_tokens as f64 / n,
            generations: load.generations as f64 / n,
            longest: load.longest as f64,
        }
    }

    fn towards(self, m: Typical) -> Self {
        let step = |a: f64, b: f64| a + TYPICAL_WEIGHT * (b - a);
        Self {
            head_tokens: step(self.head_tokens, m.head_tokens),
            prompt_tokens: step(self.prompt_tokens, m.prompt_tokens),
            generations: step(self.generations, m.generations),
            longest: step(self.longest, m.longest),
        }
    }

    fn times(&self, sequences: u64) -> Load {
        let n = sequences as f64;
        let generations = (self.generations * n).round() as u64;
        Load {
            head_tokens: (self.head_tokens * n).ceil() as u64,
            prompt_tokens: (self.prompt_tokens * n).ceil() as u64,
            generations,
            longest: if generations > 0 {
                self.longest.ceil() as u64
            } else {
                0
            },
        }
    }
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

/// The load an admitted request holds; the engine releases its parts as they are done,
/// and the rest is released when the ticket is dropped (answered or abandoned).
#[derive(Debug)]
pub struct Ticket {
    state: Arc<Mutex<State>>,
    load: Load,
    /// The request's kind, whose typical load its measured one updates.
    kind: String,
    /// Admitted on an estimate, not yet settled (counted in `preparing`).
    preparing: bool,
}

impl Ticket {
    fn release(&mut self, part: Load) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(&part);
        self.load.head_tokens -= part.head_tokens;
        self.load.prompt_tokens -= part.prompt_tokens;
        self.load.generations -= part.generations;
    }

    /// Its head sequences were computed.
    pub fn heads_done(&mut self) {
        let part = Load {
            head_tokens: self.load.head_tokens,
            ..Load::default()
        };
        self.release(part);
    }

    /// A generation's prompt of `tokens` was prefilled.
    pub fn prompt_done(&mut self, tokens: u64) {
        let part = Load {
            prompt_tokens: tokens.min(self.load.prompt_tokens),
            ..Load::default()
        };
        self.release(part);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(&self.load);
        if self.preparing {
            s.preparing = s.preparing.saturating_sub(1);
        }
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

    /// Replaces what is known of prefill times with the engine's own forwards at start
    /// (`(tokens, time)` of each), not a guess that may be several times off here.
    pub fn calibrate_prefill(&self, forwards: &[(u64, Duration)]) {
        let mut times = PrefillTimes::default();
        for &(tokens, busy) in forwards.iter().filter(|(t, b)| *t > 0 && !b.is_zero()) {
            times.record(tokens as f64, busy.as_secs_f64());
        }
        if times.w > 0.0 {
            self.lock().prefill = times;
        }
    }

    /// A forward prefilled `tokens` (padded) in `busy`.
    pub fn record_prefill(&self, tokens: u64, busy: Duration) {
        if tokens > 0 && !busy.is_zero() {
            self.lock()
                .prefill
                .record(tokens as f64, busy.as_secs_f64());
        }
    }

    /// A slice of generation prompts prefilled `tokens` in `busy` (the next slice's budget
    /// follows its pace).
    pub fn record_slice(&self, tokens: u64, busy: Duration) {
        let secs = busy.as_secs_f64();
        if tokens == 0 || secs <= 0.0 {
            return;
        }
        let pace = tokens as f64 / secs;
        let mut s = self.lock();
        s.slice_pace = Some(s.slice_pace.map_or(pace, |p| p + SLICE_WEIGHT * (pace - p)));
        s.prefill.record(tokens as f64, secs);
    }

    /// A decoding step of `n` sequences took `busy`.
    pub fn record_step(&self, n: usize, busy: Duration) {
        if n > 0 {
            self.lock().steps.record(n, busy.as_secs_f64());
        }
    }

    /// The generations decoding now, by the steps each may still take.
    pub fn observe_decoding(&self, mut remaining: Vec<usize>) {
        remaining.sort_unstable();
        self.lock().remaining = remaining;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_wait_ms: u64) -> AdmissionConfig {
        AdmissionConfig {
            max_wait: Duration::from_millis(max_wait_ms),
            max_first_token_wait: Duration::from_millis(max_wait_ms),
            max_generations: 64,
            kv_cache_bytes: 1 << 30,
            kv_bytes_per_token: 1000,
            prefill_slice: Duration::from_millis(250),
            max_batch_tokens: 4096,
        }
    }

    /// 1,000 prefill tokens per second, a step of n sequences 10 + n ms.
    fn measured(a: &Admission) {
        a.calibrate_prefill(&[(1000, Duration::from_secs(1))]);
        for n in [1usize, 16] {
            a.record_step(n, Duration::from_millis(10 + n as u64));
        }
    }

    fn heads(tokens: u64) -> Load {
        Load {
            head_tokens: tokens,
            ..Load::default()
        }
    }

    fn generation(prompt: u64, new: u64) -> Load {
        Load {
            prompt_tokens: prompt,
            generations: 1,
            longest: prompt + new,
            ..Load::default()
        }
    }

    #[test]
    fn head_work_is_admitted_within_the_budget_and_refused_beyond_it() {
        let a = Admission::new(config(1000));
        measured(&a);
        let first = a.admit(heads(600)).unwrap();
        let second = a.admit(heads(400)).unwrap();
        let refused = a.admit(heads(1)).unwrap_err();
        assert!((refused.estimated_wait.as_secs_f64() - 1.001).abs() < 0.01);
        drop(first);
        assert_eq!(a.queued().head_tokens, 400);
        let third = a.admit(heads(600)).unwrap();
        drop((second, third));
        assert_eq!(a.queued(), Load::default());
    }

    #[test]
    fn an_idle_engine_takes_any_single_request() {
        let a = Admission::new(config(1));
        let big = a.admit(heads(1_000_000)).unwrap();
        assert!(a.admit(heads(1)).is_err());
        drop(big);
        assert!(a.admit(generation(5000, 500)).is_ok());
    }

    #[test]
    fn a_step_of_many_sequences_is_not_many_steps_of_one() {
        let a = Admission::new(config(1000));
        measured(&a);
        // Measured at 1 and 16; between them on the line, beyond along it.
        assert!((a.step_seconds(8) - 0.018).abs() < 1e-9);
        assert!((a.step_seconds(64) - 0.074).abs() < 1e-9);
        // A size measured is taken as measured; later measurements move it.
        a.record_step(8, Duration::from_millis(28));
        assert!((a.step_seconds(8) - 0.028).abs() < 1e-9);
        a.record_step(8, Duration::from_millis(18));
        assert!((a.step_seconds(8) - 0.026).abs() < 1e-9);
    }

    #[test]
    fn concurrent_generations_are_admitted_while_their_first_tokens_come_in_time() {
        // 16 generations of 20-token prompts and 64 new tokens each: 320 prompt tokens and
        // a decoding step after each 250-token slice come to well under a second.
        let a = Admission::new(config(1000));
        measured(&a);
        let tickets: Vec<Ticket> = (0..16)
            .map(|_| a.admit(generation(20, 64)).unwrap())
            .collect();
        assert_eq!(a.queued().generations, 16);
        // Counted as serial work at the prefill pace (the old model), 16 x 84 tokens would
        // have been 1.3 s.
        drop(tickets);
        // Prompts admitted beyond the budget are refused, with their first token's wait.
        let long = a.admit(generation(900, 64)).unwrap();
        let refused = a.admit(generation(200, 64)).unwrap_err();
        assert!(
            refused.estimated_wait > Duration::from_millis(1000),
            "{refused:?}"
        );
        assert_eq!(refused.reason, "generations queued");
        drop(long);
    }

    #[test]
    fn a_head_request_is_admitted_behind_a_long_prefill_and_decoding() {
        // One request of 8 generations of 1,000-token prompts: 8 s of prefill. A head
        // request waits for the heads ahead of it and at most one slice and one step of
        // the generations, not for all of it.
        let a = Admission::new(config(1000));
        measured(&a);
        let big = a
            .admit(Load {
                prompt_tokens: 8000,
                generations: 8,
                longest: 2000,
                ..Load::default()
            })
            .unwrap();
        a.observe_decoding(vec![900; 8]);
        let ahead = a.admit(heads(500)).unwrap();
        let head = a.admit(heads(20));
        assert!(head.is_ok(), "{head:?}");
        // Counting the queued prompts, it would have waited 8.5 s.
        assert!(a.admit(heads(300)).is_err(), "the heads ahead still count");
        drop((big, ahead, head));
    }

    #[test]
    fn generations_past_the_slots_wait_for_one_to_end_within_the_budget_or_are_refused() {
        let a = Admission::new(AdmissionConfig {
            max_generations: 2,
            ..config(1000)
        });
        measured(&a);
        let mut decoding: Vec<Ticket> = (0..2)
            .map(|_| a.admit(generation(10, 64)).unwrap())
            .collect();
        for t in &mut decoding {
            t.prompt_done(10);
        }
        // One ends in 5 steps (~60 ms): the third waits for its slot.
        a.observe_decoding(vec![5, 60]);
        let third = a.admit(generation(10, 64)).unwrap();
        // The fourth would wait for the second to end: 60 steps of ~12 ms, under a second.
        let fourth = a.admit(generation(10, 64)).unwrap();
        // The fifth has no slot in sight: refused, with the soonest end as its wait.
        let refused = a.admit(generation(10, 64)).unwrap_err();
        assert_eq!(refused.reason, "every decoding slot is taken");
        drop((third, fourth));
        // Both decode for another 100 steps: the third's slot is beyond the budget.
        a.observe_decoding(vec![100, 100]);
        assert!(a.admit(generation(10, 64)).is_err());
        drop(decoding);
    }

    #[test]
    fn generations_beyond_the_cache_memory_are_refused() {
        // Room for 4 slots of 128 positions at 1,000 bytes each.
        let a = Admission::new(AdmissionConfig {
            kv_cache_bytes: 4 * 128 * 1000,
            ..config(10_000)
        });
        measured(&a);
        let short = a.admit(generation(10, 100)).unwrap();
        let refused = a.admit(generation(10, 500)).unwrap_err();
        assert_eq!(refused.reason, "the decoding cache is full");
        let others: Vec<Ticket> = (0..3)
            .map(|_| a.admit(generation(10, 100)).unwrap())
            .collect();
        assert!(
            a.admit(generation(10, 100)).is_err(),
            "a fifth needs 8 slots"
        );
        drop((short, others));
    }

    #[test]
    fn the_engine_releases_a_tickets_parts_as_they_are_done() {
        let a = Admission::new(config(1000));
        measured(&a);
        let mut t = a
            .admit(Load {
                head_tokens: 30,
                prompt_tokens: 50,
                generations: 2,
                longest: 90,
            })
            .unwrap();
        t.heads_done();
        t.prompt_done(20);
        assert_eq!(
            a.queued(),
            Load {
                head_tokens: 0,
                prompt_tokens: 30,
                generations: 2,
                longest: 90
            }
        );
        drop(t);
        assert_eq!(a.queued(), Load::default());
    }

    #[test]
    fn requests_in_preparation_count_at_the_typical_load_of_their_kind() {
        let a = Admission::new(config(1000));
        measured(&a);
        // Before any request was measured, a sequence is estimated at one head token.
        let first = a.reserve("QED", 2).unwrap();
        assert_eq!(a.queued().head_tokens, 2);
        let first = a.settle(first, heads(200), 2).unwrap();
        assert_eq!(a.queued().head_tokens, 200, "settled at its measured size");
        // Now a sequence is typically 100 tokens: requests being prepared count as such,
        // and the next past the budget is refused before it is prepared.
        let preparing: Vec<Ticket> = (0..7).map(|_| a.reserve("QED", 1).unwrap()).collect();
        assert_eq!(a.queued().head_tokens, 900);
        assert_eq!(a.preparing(), 7, "reserved, not yet settled");
        assert!(a.reserve("QED", 2).is_err());
        drop((first, preparing));
        assert_eq!(a.queued(), Load::default(), "released when dropped");
        assert_eq!(a.preparing(), 0);
        // A generation kind is estimated as a generation.
        let g = a.reserve("Translate", 1).unwrap();
        drop(a.settle(g, generation(30, 64), 1).unwrap());
        let g = a.reserve("Translate", 2).unwrap();
        assert_eq!(a.queued().generations, 2);
        assert_eq!(a.queued().prompt_tokens, 60);
        // A kind not seen yet counts as head work, even when generations were the last
        // seen: it is not refused on their first-token wait before it is known to be one.
        let unseen = a.reserve("BA", 1).unwrap();
        assert_eq!(a.queued().generations, 2);
        assert!(a.queued().head_tokens > 0);
        drop((g, unseen));
    }

    #[test]
    fn a_reserved_request_keeps_its_place_within_twice_its_estimate() {
        let a = Admission::new(config(1000));
        measured(&a);
        let m = a.reserve("QED", 1).unwrap();
        let m = a.settle(m, heads(100), 1).unwrap();
        let (early, late) = (a.reserve("QED", 1).unwrap(), a.reserve("QED", 1).unwrap());
        let others: Vec<Ticket> = (0..6).map(|_| a.reserve("QED", 1).unwrap()).collect();
        assert_eq!(a.queued().head_tokens, 900, "the queue is nearly full");
        // 150 tokens against an estimate of 100: kept, though the queue filled meanwhile.
        let early = a.settle(early, heads(150), 1).unwrap();
        assert_eq!(a.queued().head_tokens, 950);
        // 250 against 100 must fit as a new request would: it does not.
        assert!(a.settle(late, heads(250), 1).is_err());
        assert_eq!(
            a.queued().head_tokens,
            850,
            "a refused settlement is released"
        );
        drop((m, early, others));
        assert_eq!(a.queued(), Load::default());
    }

    #[test]
    fn a_batch_of_small_requests_costs_one_forward_not_one_each() {
        // Measured: 16 tokens in 0.13 s, 256 in 0.55 s: 0.102 s per forward, 571 tokens/s.
        let a = Admission::new(config(1000));
        a.calibrate_prefill(&[
            (16, Duration::from_millis(130)),
            (256, Duration::from_millis(550)),
        ]);
        assert!((a.prefill_fixed_seconds() - 0.102).abs() < 1e-3);
        assert!((a.pace() - 571.4).abs() < 1.0, "{}", a.pace());
        // Eight 60-token requests fit one second together (one forward: 0.94 s), though
        // each alone takes 0.2 s: one at a time, five would.
        let admitted: Vec<Ticket> = (0..8).map(|_| a.admit(heads(60)).unwrap()).collect();
        assert!(a.admit(heads(60)).is_err());
        // Further measurements move the line.
        for _ in 0..200 {
            a.record_prefill(16, Duration::from_millis(30));
            a.record_prefill(256, Duration::from_millis(450));
        }
        assert!((a.prefill_fixed_seconds() - 0.002).abs() < 1e-3);
        drop(admitted);
    }

    #[test]
    fn the_prefill_slice_follows_the_pace() {
        let a = Admission::new(config(1000));
        a.calibrate_prefill(&[(1000, Duration::from_secs(1))]);
        assert_eq!(a.prefill_budget(), 250);
        // Slices deep into a long prompt ran at 400 tokens/s: the next ones are smaller.
        a.record_slice(250, Duration::from_millis(625));
        assert_eq!(a.prefill_budget(), 100);
        let a = Admission::new(config(1000));
        a.calibrate_prefill(&[(10, Duration::from_secs(1))]);
        assert_eq!(a.prefill_budget(), MIN_PREFILL_BUDGET);
    }
}
