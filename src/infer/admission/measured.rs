//! What the engine measured, and the estimates that follow it: prefill forwards fitted as
//! a fixed cost plus a cost per token, decoding steps timed per batch size, the typical
//! load of a sequence of each kind of request. The engine reports; the request side reads.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Admission, Load};

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

/// Step times by number of sequences: an average per size measured, interpolated between
/// sizes (and extrapolated along the last two) where none was.
#[derive(Debug, Default)]
pub(super) struct StepTimes(BTreeMap<usize, f64>);

impl StepTimes {
    /// A step of `n` took `secs`: the estimate for `n` moves towards it (the first
    /// measurement of a size is taken as it is).
    pub(super) fn record(&mut self, n: usize, secs: f64) {
        self.0
            .entry(n)
            .and_modify(|t| *t += STEP_WEIGHT * (secs - *t))
            .or_insert(secs);
    }

    /// Seconds of one step of `n` sequences (0 for none).
    pub(super) fn time(&self, n: usize, prefill_pace: f64) -> f64 {
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
pub(super) struct PrefillTimes {
    /// Decayed weighted sums for the least-squares line: weight, x, y, x², xy.
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl PrefillTimes {
    /// The prior pace, until the engine has measured its own.
    pub(super) fn prior() -> Self {
        let mut p = Self::default();
        p.record(PRIOR_TOKENS_PER_SECOND, 1.0);
        p
    }

    pub(super) fn record(&mut self, tokens: f64, secs: f64) {
        let keep = PREFILL_KEEP;
        self.w = self.w * keep + 1.0;
        self.x = self.x * keep + tokens;
        self.y = self.y * keep + secs;
        self.xx = self.xx * keep + tokens * tokens;
        self.xy = self.xy * keep + tokens * secs;
    }

    /// `(fixed seconds, tokens per second)` of the fitted line; with forwards all of one
    /// size (or a line that makes no sense) no fixed part, the mean pace.
    pub(super) fn fit(&self) -> (f64, f64) {
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
    pub(super) fn time(&self, tokens: f64, per_forward: usize) -> f64 {
        if tokens <= 0.0 {
            return 0.0;
        }
        let (fixed, pace) = self.fit();
        let forwards = (tokens / per_forward.max(1) as f64).ceil();
        forwards * fixed + tokens / pace
    }

    /// The most tokens one forward prefills in `secs` (at least one token).
    pub(super) fn tokens_in(&self, secs: f64) -> f64 {
        let (fixed, pace) = self.fit();
        ((secs - fixed) * pace).max(1.0)
    }
}

/// The typical load of one sequence of a kind of request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Typical {
    pub(super) head_tokens: f64,
    pub(super) prompt_tokens: f64,
    pub(super) generations: f64,
    pub(super) longest: f64,
}

impl Typical {
    pub(super) fn of(load: &Load, sequences: u64) -> Self {
        let n = sequences.max(1) as f64;
        Self {
            head_tokens: load.head_tokens as f64 / n,
            prompt_tokens: load.prompt_tokens as f64 / n,
            generations: load.generations as f64 / n,
            longest: load.longest as f64,
        }
    }

    pub(super) fn towards(self, m: Typical) -> Self {
        let step = |a: f64, b: f64| a + TYPICAL_WEIGHT * (b - a);
        Self {
            head_tokens: step(self.head_tokens, m.head_tokens),
            prompt_tokens: step(self.prompt_tokens, m.prompt_tokens),
            generations: step(self.generations, m.generations),
            longest: step(self.longest, m.longest),
        }
    }

    pub(super) fn times(&self, sequences: u64) -> Load {
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

impl Admission {
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
