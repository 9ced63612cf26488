//! Admission by work, not by request count: a request is let in only when the work already
//! queued, at the engine's measured pace, would be done within the queue budget. Overload
//! then answers 429 at once instead of queueing for tens of seconds, and one 256-input
//! request counts as 256 inputs' worth of tokens.
//!
//! Work is counted in *token units*: every prompt token prefilled and every token a
//! generation may decode (its `max_new_tokens`, an upper bound). The pace is measured by
//! the engine itself (units done per second busy, decayed over the last ~10 s busy), so the
//! same budget holds on a 2-core CPU and on a GPU.
//!
//! A request's units are known only once it is tokenised, and tokenising is compute. So a
//! request is first admitted on an estimate (its sequences times the typical units of a
//! sequence lately, for its kind: its functions, or a raw template), which it holds while
//! it is prepared, then settled at its measured size. Work in preparation thus counts in
//! the queue: a burst is refused before its requests are tokenised, not after. (Checked
//! on the smallest size instead, 1,000 of a 256-client burst's 1,024 requests were
//! tokenised, then refused; their 429s waited on the lowered compute threads.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The pace assumed before anything was measured, weighted as one second of work. The
/// engine replaces it with a measured one before it serves (`calibrate`).
const PRIOR_UNITS_PER_SECOND: f64 = 2000.0;
/// Busy seconds over which older measurements fade.
const PACE_MEMORY_SECONDS: f64 = 10.0;
/// Weight of each settled request in the typical units of a sequence.
const TYPICAL_WEIGHT: f64 = 0.1;
/// Kinds of request whose typical size is kept (kinds are served functions, so this is
/// only a bound on memory); a kind past it is estimated by the typical size of any.
const MAX_KINDS: usize = 4096;

#[derive(Debug)]
struct State {
    /// Units admitted and not yet finished.
    queued: u64,
    /// Decayed sums: units done, and seconds the engine was busy doing them.
    done_units: f64,
    busy_seconds: f64,
    /// Units of a sequence, averaged over the requests of each kind settled lately, and
    /// over those of every kind.
    typical_by_kind: HashMap<String, f64>,
    typical: Option<f64>,
}

impl State {
    /// Measured units per second of engine time.
    fn pace(&self) -> f64 {
        self.done_units / self.busy_seconds.max(1e-9)
    }

    /// Moves the typical units of a sequence of `kind`, and of any, towards `measured`.
    fn learn(&mut self, kind: &str, measured: f64) {
        let towards = |t: f64| t + TYPICAL_WEIGHT * (measured - t);
        self.typical = Some(self.typical.map_or(measured, towards));
        if let Some(t) = self.typical_by_kind.get_mut(kind) {
            *t = towards(*t);
        } else if self.typical_by_kind.len() < MAX_KINDS {
            self.typical_by_kind.insert(kind.to_string(), measured);
        }
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
    /// The request's kind, whose typical size its measured one updates.
    kind: String,
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
                typical_by_kind: HashMap::new(),
                typical: None,
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
    fn admit(&self, units: u64) -> Result<Ticket, Refused> {
        let mut s = self.lock();
        if let Some(refused) = self.refusal(&s, units) {
            return Err(refused);
        }
        s.queued += units;
        Ok(Ticket {
            state: self.state.clone(),
            units,
            kind: String::new(),
        })
    }

    /// Lets a request of `kind` with `sequences` in on an estimate of its units (the
    /// typical units of a sequence of its kind lately, else of any kind, else one), to hold
    /// while it is prepared, or says how long the queue already is.
    pub fn reserve(&self, kind: &str, sequences: u64) -> Result<Ticket, Refused> {
        let typical = {
            let s = self.lock();
            s.typical_by_kind.get(kind).copied().or(s.typical)
        };
        let estimate = (sequences as f64 * typical.unwrap_or(1.0)).ceil() as u64;
        let mut ticket = self.admit(estimate.max(sequences))?;
        ticket.kind = kind.to_string();
        Ok(ticket)
    }

    /// Replaces a reservation with the prepared request's `units` (of `sequences`). Within
    /// twice its reservation a request keeps its place, whatever else was reserved
    /// meanwhile (the estimate is a typical size, not a bound, and refusing it now would
    /// waste its preparation); a larger one must fit beside the queue as a new one would.
    pub fn settle(
        &self,
        mut reservation: Ticket,
        units: u64,
        sequences: u64,
    ) -> Result<Ticket, Refused> {
        let mut s = self.lock();
        s.queued = s.queued.saturating_sub(reservation.units);
        let reserved = std::mem::take(&mut reservation.units);
        if sequences > 0 {
            s.learn(&reservation.kind, units as f64 / sequences as f64);
        }
        if units > reserved.saturating_mul(2) {
            if let Some(refused) = self.refusal(&s, units) {
                return Err(refused);
            }
        }
        s.queued += units;
        reservation.units = units;
        Ok(reservation)
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
        let refused = a.admit(1).unwrap_err();
        assert!((refused.estimated_wait.as_secs_f64() - 1.0).abs() < 0.01);
        drop(first);
        assert_eq!(a.queued_units(), 400);
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

    /// A measured pace of 1,000 units per second and a one-second budget.
    fn at_1000_per_second() -> Admission {
        let a = Admission::new(Duration::from_secs(1));
        for _ in 0..100 {
            a.record(1000, Duration::from_secs(1));
        }
        a
    }

    #[test]
    fn requests_in_preparation_count_at_the_typical_size() {
        let a = at_1000_per_second();
        // Before any request was measured, a sequence is estimated at one unit.
        let first = a.reserve("QED", 2).unwrap();
        assert_eq!(a.queued_units(), 2);
        let first = a.settle(first, 200, 2).unwrap();
        assert_eq!(a.queued_units(), 200, "settled at its measured size");
        // Now a sequence is typically 100 units: 8 more fit the budget while they are
        // being prepared, the next is refused before it is.
        let preparing: Vec<Ticket> = (0..8).map(|_| a.reserve("QED", 1).unwrap()).collect();
        assert_eq!(a.queued_units(), 1000);
        assert!(a.reserve("QED", 1).is_err());
        drop((first, preparing));
        assert_eq!(
            a.queued_units(),
            0,
            "reservations are released when dropped"
        );
    }

    #[test]
    fn a_reserved_request_keeps_its_place_within_twice_its_estimate() {
        let a = at_1000_per_second();
        let measured = a.reserve("QED", 1).unwrap();
        let measured = a.settle(measured, 100, 1).unwrap();
        let (early, late) = (a.reserve("QED", 1).unwrap(), a.reserve("QED", 1).unwrap());
        let others: Vec<Ticket> = (0..7).map(|_| a.reserve("QED", 1).unwrap()).collect();
        assert_eq!(a.queued_units(), 1000, "the queue is full");
        // 150 units against an estimate of 100: kept, though the queue filled meanwhile.
        let early = a.settle(early, 150, 1).unwrap();
        assert_eq!(a.queued_units(), 1050);
        // 250 units against 100 must fit as a new request would: it does not.
        assert!(a.settle(late, 250, 1).is_err());
        assert_eq!(
            a.queued_units(),
            950,
            "a refused settlement releases its reservation"
        );
        drop((measured, early, others));
        assert_eq!(a.queued_units(), 0);
    }

    #[test]
    fn each_kind_of_request_is_estimated_at_its_own_typical_size() {
        let a = at_1000_per_second();
        let generation = a.reserve("Translate", 1).unwrap();
        drop(a.settle(generation, 500, 1).unwrap());
        let head = a.reserve("QED", 2).unwrap();
        drop(a.settle(head, 100, 2).unwrap());
        let heads = a.reserve("QED", 4).unwrap();
        assert_eq!(a.queued_units(), 200, "four sequences of a head's 50 units");
        let generation = a.reserve("Translate", 1).unwrap();
        assert_eq!(a.queued_units(), 700);
        drop(generation);
        // A kind never measured: the typical size of any (moved a tenth of the way from
        // 500 towards 50).
        let other = a.reserve("BA", 1).unwrap();
        assert_eq!(a.queued_units(), 200 + 455);
        drop((heads, other));
    }
}
