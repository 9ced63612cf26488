//! The prediction engine: a queue drained by one inference thread that batches work across
//! requests. Tags are just embeddings, so sequences with different tags share one padded
//! forward pass. Generations advance one token per iteration, all of them in one batched
//! forward, interleaved with new work, so a long generation never holds up a regression
//! request. Work whose client went away is dropped, before it runs or between tokens.
//!
//! This file is the engine's handle (admission, submission) and its thread (a supervisor
//! that restarts it after a panic, and the loop); `scheduler` holds what waits and what is
//! in flight, `executor` the forward passes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::DType;
use tokio::sync::{mpsc, oneshot};

use super::admission::{Admission, Refused, Ticket};
use super::executor::{self, Generations};
use super::heads::Prediction;
use super::scheduler::{sequence_count, work_units, Flights, Queue, Work};
use crate::model::{BaseModel, GenerationParams, Mode};
use crate::tags::compose::Composed;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Padded tokens (batch x longest sequence) per forward pass.
    pub max_batch_tokens: usize,
    /// A shared prefix at least this long is computed once for several functions.
    pub min_shared_prefix: usize,
    /// Admission: the longest estimated wait in the queue a new request may face (more
    /// answers 429 at once); work still queued after twice this fails with 503.
    pub max_queue_wait: Duration,
    /// How the engine's forward reads the frozen matrices (training keeps f32).
    pub precision: crate::model::Precision,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 4096,
            min_shared_prefix: 8,
            max_queue_wait: Duration::from_millis(700),
            precision: crate::model::Precision::F32,
        }
    }
}

/// Several sequences that belong together: one input under one or more functions. When
/// there are several, their common prefix is computed once.
#[derive(Debug, Clone)]
pub struct Group {
    pub seqs: Vec<Composed>,
}

#[derive(Debug)]
pub struct Timings {
    pub queue: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// Not admitted: the queue already holds more work than its wait budget.
    #[error("{0}")]
    Overloaded(Refused),
    /// Admitted, but not started before its deadline (the pace dropped).
    #[error("waited {:.1} s in the queue without being started; retry later", .0.as_secs_f64())]
    Expired(Duration),
    #[error("{0}")]
    Failed(String),
}

pub type Reply = Result<(Vec<Vec<Prediction>>, Timings), EngineError>;

/// Text pieces of a streamed generation, as they become printable.
pub type TextPieces = mpsc::UnboundedSender<String>;

#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Work>,
    pub(super) metrics: Arc<crate::infer::EngineMetrics>,
    /// Bounds what the (otherwise unbounded) channel can hold, in work.
    pub admission: Admission,
    /// Cleared while the engine is down (restarting after a panic, or gone): `/ready`
    /// reads it.
    alive: Arc<AtomicBool>,
    /// Armed by `inject_fault`: the engine panics at its next decoding step.
    fault: Arc<AtomicBool>,
}

/// How long a crashed engine stays down before it restarts (`/ready` answers 503 in the
/// meantime): a fault that recurs at once must not spin.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Clears the engine's liveness flag when the inference thread exits or unwinds.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Token units per second of a padded head batch (4 sequences of 64 tokens), timed on its
/// second run (the first pays one-time costs: allocation, kernel loading).
fn measure_pace(model: &BaseModel) -> Result<(u64, Duration)> {
    let (batch, len) = (4usize, 64usize);
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..(batch * len) as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let rows = model
        .llama
        .embed_ids(&ids)?
        .reshape((batch, len, model.config().hidden_size))?;
    let mut busy = Duration::ZERO;
    for _ in 0..2 {
        let started = Instant::now();
        let hidden = model.llama.forward(&rows, None, None, Mode::Fast)?;
        // Waits for the device (a GPU runs asynchronously) by reading one value back.
        hidden
            .narrow(1, len - 1, 1)?
            .flatten_all()?
            .get(0)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        busy = started.elapsed();
    }
    Ok(((batch * len) as u64, busy))
}

/// Marks the engine down when dropped by a panic's unwinding.
struct DownOnPanic<'a>(&'a AtomicBool);

impl Drop for DownOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(false, Ordering::SeqCst);
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Engine {
    pub fn start(
        model: Arc<BaseModel>,
        cfg: EngineConfig,
        metrics: Arc<crate::infer::EngineMetrics>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut queue = Queue::new(rx);
        let m = metrics.clone();
        let admission = Admission::new(cfg.max_queue_wait);
        let pace = admission.clone();
        let alive = Arc::new(AtomicBool::new(true));
        let fault = Arc::new(AtomicBool::new(false));
        let (up, armed) = (alive.clone(), fault.clone());
        let guard = AliveGuard(alive.clone());
        // The pace admission starts from is this machine's, measured before the first request.
        let (units, busy) = measure_pace(&model)?;
        pace.calibrate(units, busy);
        tracing::info!(
            units_per_second = units as f64 / busy.as_secs_f64().max(1e-9),
            "engine pace measured"
        );
        // The supervisor: runs the engine, and after a panic (its requests in flight have
        // failed with 5xx) pauses with /ready at 503, then serves the same queue again.
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                let _guard = guard;
                crate::model::threads::lower_this_thread_priority();
                loop {
                    let served = catch_unwind(AssertUnwindSafe(|| {
                        run(&model, &cfg, &mut queue, &m, &pace, &armed, &up)
                    }));
                    let Err(panic) = served else { return };
                    up.store(false, Ordering::SeqCst);
                    m.restarts.inc();
                    tracing::error!(
                        panic = %panic_message(panic.as_ref()),
                        "the inference engine failed; its requests in flight got 500s; restarting"
                    );
                    std::thread::sleep(RESTART_PAUSE);
                    up.store(true, Ordering::SeqCst);
                }
            })?;
        Ok(Self {
            tx,
            metrics,
            admission,
            alive,
            fault,
        })
    }

    /// Whether the engine is serving (false while it restarts after a fault).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Makes the engine panic at its next decoding step, for tests of its recovery.
    #[doc(hidden)]
    pub fn inject_fault(&self) {
        self.fault.store(true, Ordering::SeqCst);
    }

    /// Queues the groups and waits for one list of predictions per group.
    /// Refused at once (429) when the queue's work would take longer than its budget.
    pub async fn predict(
        &self,
        groups: Vec<Group>,
        params: GenerationParams,
        reservation: Ticket,
    ) -> Reply {
        self.submit(groups, params, None, reservation)?.wait().await
    }

    /// Queues the groups, settling the `reservation` they were admitted on while they were
    /// prepared (or refuses them at once, 429, if they turned out too large for it);
    /// `stream` receives a generation's text as it is decoded. Dropping the returned
    /// handle abandons the work.
    pub fn submit(
        &self,
        groups: Vec<Group>,
        params: GenerationParams,
        stream: Option<TextPieces>,
        reservation: Ticket,
    ) -> Result<Submitted, EngineError> {
        let (units, sequences) = (work_units(&groups, &params), sequence_count(&groups));
        let ticket = self
            .admission
            .settle(reservation, units, sequences as u64)
            .map_err(|refused| {
                let after = ["after_preparation"];
                self.metrics.refusals.with_label_values(&after).inc();
                EngineError::Overloaded(refused)
            })?;
        let (reply, rx) = oneshot::channel();
        self.metrics.queue_depth.inc();
        let now = Instant::now();
        let work = Work {
            groups,
            params,
            reply,
            stream,
            enqueued: now,
            deadline: now + 2 * self.admission.max_wait(),
        };
        if self.tx.send(work).is_err() {
            self.metrics.queue_depth.dec();
            return Err(EngineError::Failed(
                "the inference thread has stopped".into(),
            ));
        }
        Ok(Submitted {
            _ticket: ticket,
            reply: rx,
        })
    }
}

/// Work in the engine: its answer, once it comes. Holds the work's admission ticket.
pub struct Submitted {
    _ticket: Ticket,
    reply: oneshot::Receiver<Reply>,
}

impl Submitted {
    pub async fn wait(self) -> Reply {
        self.reply.await.map_err(|_| {
            EngineError::Failed("the inference thread dropped the request".to_string())
        })?
    }
}

/// Serves until every sender is gone. A panic anywhere in here unwinds out of it: the
/// requests in flight (owned by this frame) get their replies dropped, and the supervisor
/// in `Engine::start` restarts it on the same queue.
fn run(
    model: &BaseModel,
    cfg: &EngineConfig,
    queue: &mut Queue,
    metrics: &crate::infer::EngineMetrics,
    pace: &Admission,
    fault: &AtomicBool,
    alive: &AtomicBool,
) {
    let mut flights = Flights::default();
    let mut generations = Generations::new(model);
    // Declared after the work it guards, so it drops first when a panic unwinds: /ready
    // says the engine is down before any failed reply goes out.
    let _down = DownOnPanic(alive);
    loop {
        // 1. Intake: wait only when there is nothing else to do.
        let Some(intake) = queue.take(flights.is_empty(), cfg.max_batch_tokens, metrics) else {
            return;
        };
        let iteration = Instant::now();
        let mut units = intake.iter().map(Work::prompt_tokens).sum::<usize>() as u64;

        // 2. Every head sequence of the intake in shared forwards; generations start.
        if !intake.is_empty() {
            let started = Instant::now();
            let n_seqs: usize = intake.iter().map(Work::sequences).sum();
            metrics.batch_size.observe(n_seqs as f64);
            let predictions = executor::heads(model, cfg, &intake);
            for (work, outcome) in intake.into_iter().zip(predictions) {
                let id = flights.insert(work, outcome, started, n_seqs);
                let Some(f) = flights.get_mut(id).filter(|f| f.failure.is_none()) else {
                    continue;
                };
                match generations.start(model, id, &mut f.work) {
                    Ok(open) => f.open_generations = open,
                    Err(e) => f.failure = Some(e),
                }
            }
        }

        // 3. New generations join the decoding batch (their first token); then one token
        //    for every generation in one batched forward.
        generations.join(model, cfg.max_batch_tokens, &mut flights);
        if !generations.is_empty() && fault.swap(false, Ordering::SeqCst) {
            panic!("a fault injected through Engine::inject_fault");
        }
        generations.drop_unwanted(&mut flights);
        units += generations.len() as u64;
        generations.step(model, &mut flights);
        pace.record(units, iteration.elapsed());
        metrics.decoding.set(generations.len() as i64);
        metrics
            .decode_cache_bytes
            .set(generations.cache_bytes() as i64);

        // 4. Answer what is complete; forget what nobody waits for any more.
        for id in flights.finish() {
            generations.forget(id);
        }
    }
}
