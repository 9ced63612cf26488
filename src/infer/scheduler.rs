//! The engine's scheduler: what waits (the queue, taken in batches within a token budget,
//! work past its deadline answered at once) and what is being worked on (requests in
//! flight, each answered once all its sequences are done or one of them failed).

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::admission::{Load, Ticket};
use super::heads::Prediction;
use super::work::{EngineError, Group, Reply, TextPieces, Timings};
use super::EngineMetrics;
use crate::model::GenerationParams;
use crate::tags::compose::Composed;

/// One request in the queue.
pub(super) struct Work {
    pub groups: Vec<Group>,
    pub params: GenerationParams,
    pub reply: oneshot::Sender<Reply>,
    /// Streaming: where the one generation's text pieces go (handed to it when it starts).
    pub stream: Option<TextPieces>,
    pub enqueued: Instant,
    pub deadline: Instant,
    /// What admission let in for it; the engine releases its parts as they are done.
    pub ticket: Ticket,
}

/// Tokens one sequence takes: its prompt, plus, for a generation, every token it may
/// decode (what its KV cache may come to hold).
pub fn sequence_tokens(c: &Composed, params: &GenerationParams) -> usize {
    c.len()
        + if c.head.is_none() {
            params.max_new_tokens
        } else {
            0
        }
}

/// What a request asks of the engine (see `admission`): its head sequences' tokens, its
/// generations' prompts, and how many generations and how long the longest may grow.
pub fn work_load(groups: &[Group], params: &GenerationParams) -> Load {
    let mut load = Load::default();
    for c in groups.iter().flat_map(|g| &g.seqs) {
        if c.head.is_some() {
            load.head_tokens += c.len() as u64;
        } else {
            load.prompt_tokens += c.len() as u64;
            load.generations += 1;
            load.longest = load.longest.max(sequence_tokens(c, params) as u64);
        }
    }
    load
}

/// Sequences of a request: one per input and function.
pub fn sequence_count(groups: &[Group]) -> usize {
    groups.iter().map(|g| g.seqs.len()).sum()
}

impl Work {
    /// Answers it, its admission released first: a client that gets its answer and sends
    /// the next request at once must find the engine's capacity already free.
    fn respond(self, reply: Reply) {
        let Work {
            reply: to, ticket, ..
        } = self;
        drop(ticket);
        let _ = to.send(reply);
    }

    /// Its head sequences padded to the longest: what it adds to the iteration's head
    /// forwards (generations are prefilled in slices of their own).
    fn padded_tokens(&self) -> usize {
        let heads = || {
            self.groups
                .iter()
                .flat_map(|g| &g.seqs)
                .filter(|c| c.head.is_some())
        };
        heads().map(Composed::len).max().unwrap_or(0) * heads().count()
    }

    pub fn sequences(&self) -> usize {
        sequence_count(&self.groups)
    }

    /// Prompt tokens of its head sequences.
    pub fn head_tokens(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| &g.seqs)
            .filter(|c| c.head.is_some())
            .map(Composed::len)
            .sum()
    }
}

/// How long an engine woken from idle waits for requests still being prepared, and how
/// often it looks.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);
const GATHER_POLL: std::time::Duration = std::time::Duration::from_micros(250);

/// The engine's end of the request channel. Work taken from the channel but left for the
/// next batch (it did not fit the budget) waits in `pending`.
pub(super) struct Queue {
    rx: mpsc::UnboundedReceiver<Work>,
    pending: Option<Work>,
}

impl Queue {
    pub fn new(rx: mpsc::UnboundedReceiver<Work>) -> Self {
        Self { rx, pending: None }
    }

    /// The work to start now: waits for some only when the engine is `idle`, then takes
    /// whatever is already queued up to `max_batch_tokens` padded head tokens (generations
    /// are taken whatever their size: they queue for their prefill slices). Work whose
    /// client went away is dropped; work past its deadline is answered at once (its client
    /// would rather retry than wait on). `None` once every sender is gone.
    ///
    /// Woken from idle, it also waits (at most `GATHER`) for the requests admitted and
    /// still being prepared (`preparing`): they arrive within a millisecond or two, and
    /// starting without them would run a batch of one and leave them for the next. (Under
    /// a storm of one-input requests, batches of one or two halved the engine's pace.)
    pub fn take(
        &mut self,
        idle: bool,
        max_batch_tokens: usize,
        metrics: &EngineMetrics,
        preparing: impl Fn() -> u64,
    ) -> Option<Vec<Work>> {
        let mut intake = Vec::new();
        if let Some(w) = self.pending.take() {
            intake.push(w);
        } else if idle {
            intake.push(self.rx.blocking_recv()?);
        }
        let woken = Instant::now();
        let mut tokens: usize = intake.iter().map(Work::padded_tokens).sum();
        loop {
            match self.rx.try_recv() {
                Ok(w) => {
                    if !intake.is_empty() && tokens + w.padded_tokens() > max_batch_tokens {
                        self.pending = Some(w);
                        break;
                    }
                    tokens += w.padded_tokens();
                    intake.push(w);
                }
                Err(_) if idle && preparing() > 0 && woken.elapsed() < GATHER => {
                    std::thread::sleep(GATHER_POLL);
                }
                Err(_) => break,
            }
        }
        metrics.queue_depth.sub(intake.len() as i64);
        let now = Instant::now();
        intake.retain(|w| !w.reply.is_closed());
        let (late, intake): (Vec<Work>, Vec<Work>) =
            intake.into_iter().partition(|w| now > w.deadline);
        for w in late {
            let waited = now - w.enqueued;
            w.respond(Err(EngineError::Expired(waited)));
        }
        Some(intake)
    }
}

/// A request being worked on: head predictions are filled at once, generations one token
/// per engine iteration, interleaved with everything else.
pub(super) struct InFlight {
    pub work: Work,
    /// One slot per sequence of each group, filled as predictions come.
    pub preds: Vec<Vec<Option<Prediction>>>,
    pub open_generations: usize,
    pub failure: Option<String>,
    started: Instant,
    batch_size: usize,
}

/// Requests in flight, by id.
#[derive(Default)]
pub(super) struct Flights {
    map: HashMap<u64, InFlight>,
    next_id: u64,
}

impl Flights {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Starts tracking `work` (started at `started` in a batch of `batch_size` sequences),
    /// with the head predictions already made, or the failure that ends it.
    pub fn insert(
        &mut self,
        work: Work,
        outcome: Result<Vec<Vec<Option<Prediction>>>, String>,
        started: Instant,
        batch_size: usize,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let (preds, failure) = match outcome {
            Ok(p) => (p, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        self.map.insert(
            id,
            InFlight {
                work,
                preds,
                open_generations: 0,
                failure,
                started,
                batch_size,
            },
        );
        id
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut InFlight> {
        self.map.get_mut(&id)
    }

    /// Whether anyone still waits for request `id`'s answer and nothing failed it.
    pub fn wanted(&self, id: u64) -> bool {
        self.map
            .get(&id)
            .is_some_and(|f| f.failure.is_none() && !f.work.reply.is_closed())
    }

    pub fn fail(&mut self, id: u64, why: String) {
        if let Some(f) = self.map.get_mut(&id) {
            f.failure = Some(why);
        }
    }

    /// Answers every request that is complete or failed, forgets those nobody waits for
    /// any more, and returns the ids of all it removed (their generations must stop).
    pub fn finish(&mut self) -> Vec<u64> {
        let done: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, f)| {
                f.failure.is_some() || f.open_generations == 0 || f.work.reply.is_closed()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &done {
            if let Some(f) = self.map.remove(id) {
                f.answer();
            }
        }
        done
    }
}

impl InFlight {
    fn answer(self) {
        if self.work.reply.is_closed() {
            return;
        }
        let timings = Timings {
            queue: self.started - self.work.enqueued,
            inference: self.started.elapsed(),
            batch_size: self.batch_size,
        };
        let result = match self.failure {
            Some(e) => Err(EngineError::Failed(e)),
            // No failure and no open generation: every slot should be filled.
            None => self
                .preds
                .into_iter()
                .map(|g| g.into_iter().collect::<Option<Vec<_>>>())
                .collect::<Option<Vec<_>>>()
                .map(|p| (p, timings))
                .ok_or_else(|| {
                    EngineError::Failed(
                        "internal error: a sequence produced no prediction".to_string(),
                    )
                }),
        };
        self.work.respond(result);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A head request of `tokens`.
    fn work(tokens: usize, deadline_in: Duration) -> (Work, oneshot::Receiver<Reply>) {
        work_of(Composed::of_head_tokens(&vec![1; tokens], 1), deadline_in)
    }

    fn work_of(seq: Composed, deadline_in: Duration) -> (Work, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let admission =
            super::super::admission::Admission::new(super::super::admission::AdmissionConfig {
                max_wait: Duration::from_secs(1),
                max_first_token_wait: Duration::from_secs(1),
                max_generations: 64,
                kv_cache_bytes: 1 << 30,
                kv_bytes_per_token: 1,
                prefill_slice: Duration::from_millis(100),
                max_batch_tokens: 4096,
            });
        let w = Work {
            groups: vec![Group { seqs: vec![seq] }],
            params: GenerationParams::default(),
            reply,
            stream: None,
            enqueued: now,
            deadline: now + deadline_in,
            ticket: admission.admit(Load::default()).unwrap(),
        };
        (w, rx)
    }

    fn metrics() -> EngineMetrics {
        EngineMetrics::new(&prometheus::Registry::new()).unwrap()
    }

    #[test]
    fn takes_what_fits_the_token_budget_and_keeps_the_rest_for_next_time() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut queue = Queue::new(rx);
        let mut waiting = Vec::new();
        for _ in 0..3 {
            let (w, r) = work(10, Duration::from_secs(60));
            tx.send(w).unwrap();
            waiting.push(r);
        }
        let m = metrics();
        let first = queue.take(true, 25, &m, || 0).unwrap();
        assert_eq!(first.len(), 2, "two of 10 tokens fit 25");
        let second = queue.take(false, 25, &m, || 0).unwrap();
        assert_eq!(second.len(), 1, "the third waited for the next batch");
        assert!(queue.take(false, 25, &m, || 0).unwrap().is_empty());
        // One request larger than the whole budget still goes through, alone.
        let (big, _r) = work(100, Duration::from_secs(60));
        tx.send(big).unwrap();
        assert_eq!(queue.take(false, 25, &m, || 0).unwrap().len(), 1);
        // Generations are taken whatever their prompts: they are prefilled in slices.
        let mut generations = Vec::new();
        for _ in 0..3 {
            let (w, r) = work_of(Composed::of_tokens(&[1; 100]), Duration::from_secs(60));
            tx.send(w).unwrap();
            generations.push(r);
        }
        assert_eq!(queue.take(false, 25, &m, || 0).unwrap().len(), 3);
        drop(tx);
        assert!(
            queue.take(true, 25, &m, || 0).is_none(),
            "every sender gone"
        );
    }

    #[test]
    fn work_past_its_deadline_is_answered_and_abandoned_work_is_dropped() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut queue = Queue::new(rx);
        let (late, mut late_reply) = work(5, Duration::ZERO);
        let (abandoned, abandoned_reply) = work(5, Duration::from_secs(60));
        let (live, _live_reply) = work(5, Duration::from_secs(60));
        drop(abandoned_reply);
        for w in [late, abandoned, live] {
            tx.send(w).unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
        let taken = queue.take(true, 100, &metrics(), || 0).unwrap();
        assert_eq!(taken.len(), 1, "only the live request is started");
        assert!(matches!(
            late_reply.try_recv(),
            Ok(Err(EngineError::Expired(_)))
        ));
    }

    #[test]
    fn a_flight_is_answered_once_its_generations_are_done_or_it_failed() {
        let mut flights = Flights::default();
        let (w, mut reply) = work(3, Duration::from_secs(60));
        let id = flights.insert(w, Ok(vec![vec![None]]), Instant::now(), 1);
        flights.get_mut(id).unwrap().open_generations = 1;
        assert!(flights.finish().is_empty(), "a generation is still open");
        assert!(flights.wanted(id));
        let f = flights.get_mut(id).unwrap();
        f.preds[0][0] = Some(Prediction::Value { value: 0.5 });
        f.open_generations = 0;
        assert_eq!(flights.finish(), vec![id]);
        let (preds, _) = reply.try_recv().unwrap().unwrap();
        assert!(matches!(preds[0][0], Prediction::Value { .. }));

        let (w, mut reply) = work(3, Duration::from_secs(60));
        let id = flights.insert(w, Ok(vec![vec![None]]), Instant::now(), 1);
        flights.get_mut(id).unwrap().open_generations = 1;
        flights.fail(id, "boom".into());
        assert!(!flights.wanted(id));
        assert_eq!(flights.finish(), vec![id]);
        assert!(matches!(reply.try_recv(), Ok(Err(EngineError::Failed(m))) if m == "boom"));
        assert!(flights.is_empty());
    }
}
