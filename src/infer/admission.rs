//! Admission by work, not by request count: a request is let in only when the work already
//! queued, at the engine's measured pace, would be done within the queue budget. Overload
//! then answers 429 at once instead of queueing for tens of seconds, and one 256-input
//! request counts as 256 inputs' worth of tokens.
//!
//! Work is counted in *token units*: every prompt token prefilled and every token a
//! generation may decode (its `max_new_tokens`, an upper bound). The pace is measured by
//! the engine itself (units done per second busy, decayed over the last ~10 s busy), so the
//! same budget holds on a 2-core CPU and on a GPU.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The pace assumed before anything was measured, weighted as one second of work. The
/// engine replaces it with a measured one before it serves (`calibrate`).
const PRIOR_UNITS_PER_SECOND: f64 = 2000.0;
/// Busy seconds over which older measurements fade.
const PACE_MEMORY_SECONDS: f64 = 10.0;

#[derive(Debug)]
struct State {
    /// Units admitted and not yet finished.
    queued: u64,
    /// Decayed sums: units done, and seconds the engine was busy doing them.
    done_units: f64,
    busy_seconds: f64,
}

impl State {
    /// Measured units per second of engine time.
    fn pace(&self) -> f64 {
        self.done_units / self.busy_seconds.max(1e-9)
    }
}

/// Shared between the request side (admit, release) and the engine thread (record).
#[derive(Debug, Clone)]
pub struct Admission {
    state: Arc<Mutex<State>>,
    /// The longest estimated wait a new request may face. An empty queue takes any one
    /// request, however large, so nothing within the request limits is refused forever.
    max_wait: Duration,
}

/// Why a request was not admitted: the estimated wait, for the client's `Retry-After`.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub estimated_wait: Duration,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server is at capacity (about {:.1} s of work queued); retry later",
            self.estimated_wait.as_secs_f64()
        )
    }
}

/// Units held by an admitted request; released when dropped (answered or abandoned).
#[derive(Debug)]
pub struct Ticket {
    state: Arc<Mutex<State>>,
    units: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.queued = s.queued.saturating_sub(self.units);
    }
}

impl Admission {
    pub fn new(max_wait: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                queued: 0,
                done_units: PRIOR_UNITS_PER_SECOND,
                busy_seconds: 1.0,
            })),
            max_wait,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Measured units per second of engine time.
    pub fn pace(&self) -> f64 {
        self.lock().pace()
    }

    pub fn queued_units(&self) -> u64 {
        self.lock().queued
    }

    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Lets `units` of work in, or says how long the queue already is.
    pub fn admit(&self, units: u64) -> Result<Ticket, Refused> {
        let mut s = self.lock();
        if let Some(refused) = self.refusal(&s, units) {
            return Err(refused);
        }
        s.queued += units;
        Ok(Ticket {
            state: self.state.clone(),
            units,
        })
    }

    /// Whether `units` of work would be refused now, without letting anything in: a
    /// request can be turned away on its smallest possible size before the work of
    /// preparing it, which is what keeps 429s fast under overload.
    pub fn check(&self, units: u64) -> Result<(), Refused> {
        match self.refusal(&self.lock(), units) {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
    }

    fn refusal(&self, s: &State, units: u64) -> Option<Refused> {
        let pace = s.pace();
        let budget = (pace * self.max_wait.as_secs_f64()) as u64;
        (s.queued > 0 && s.queued + units > budget).then(|| Refused {
            estimated_wait: Duration::from_secs_f64(s.queued as f64 / pace.max(1e-9)),
        })
    }

    /// Replaces what is known of the pace with one measurement, weighted as one second of
    /// work: the engine's own forward pass at start, instead of a guess that may be several
    /// times off on this hardware (an optimistic guess admits work that then expires: 503s).
    pub fn calibrate(&self, units: u64, busy: Duration) {
        let secs = busy.as_secs_f64();
        if secs <= 0.0 || units == 0 {
            return;
        }
        let mut s = self.lock();
        s.done_units = units as f64 / secs;
        s.busy_seconds = 1.0;
    }

    /// The engine did `units` of work in `busy` (one loop iteration).
    pub fn record(&self, units: u64, busy: Duration) {
        let secs = busy.as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        let mut s = self.lock();
        let keep = (-secs / PACE_MEMORY_SECONDS).exp();
        s.done_units = s.done_units * keep + units as f64;
        s.busy_seconds = s.busy_seconds * keep + secs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_within_the_budget_and_refuses_beyond_it() {
        let a = Admission::new(Duration::from_secs(1));
        // Measured: 1,000 units per second, long enough to forget the prior.
        for _ in 0..100 {
            a.record(1000, Duration::from_secs(1));
        }
        assert!((a.pace() - 1000.0).abs() < 1.0, "{}", a.pace());
        let first = a.admit(600).unwrap();
        let second = a.admit(400).unwrap();
        assert!(a.check(1).is_err(), "check agrees with admit");
        let refused = a.admit(1).unwrap_err();
        assert!((refused.estimated_wait.as_secs_f64() - 1.0).abs() < 0.01);
        drop(first);
        assert_eq!(a.queued_units(), 400);
        assert!(
            a.check(600).is_ok() && a.queued_units() == 400,
            "check takes nothing"
        );
        let third = a.admit(600).unwrap();
        drop((second, third));
        assert_eq!(a.queued_units(), 0);
    }

    #[test]
    fn an_idle_server_takes_any_single_request() {
        let a = Admission::new(Duration::from_millis(1));
        let big = a.admit(1_000_000).unwrap();
        assert!(a.admit(1).is_err());
        drop(big);
        assert!(a.admit(5).is_ok());
    }
}
