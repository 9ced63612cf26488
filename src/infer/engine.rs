//! The prediction engine: a queue drained by one inference thread that batches work across
//! requests. Tags are just embeddings, so sequences with different tags share one padded
//! forward pass. Each iteration computes the head sequences that came in, then one slice
//! of generation prompts (chunks of long ones), then one decoding step for every
//! generation, in one batched forward: a long prompt or generation never holds up a
//! regression request for more than a slice and a step. Work whose client went away is
//! dropped, before it runs or between tokens.
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

use super::admission::{Admission, AdmissionConfig, Ticket};
use super::executor::{self, Generations};
use super::scheduler::{sequence_count, work_load, Flights, Queue, Work};
pub use super::work::{EngineConfig, EngineError, Group, Reply, TextPieces, Timings};
use crate::model::{BaseModel, DecodeBatch, Decoder, GenerationParams, Mode};

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

/// Prefill times of padded head batches of 1 x 16 and 4 x 64 tokens (what admission fits
/// its model of a forward's time to), each timed on its second run (the first pays
/// one-time costs: allocation, kernel loading).
fn measure_prefill(model: &BaseModel) -> Result<Vec<(u64, Duration)>> {
    let vocab = model.config().vocab_size as u32;
    let mut times = Vec::new();
    for (batch, len) in [(1usize, 16usize), (4, 64)] {
        let ids: Vec<u32> = (0..(batch * len) as u32)
            .map(|i| (i * 7919 + 13) % vocab)
            .collect();
        let rows =
            model
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
        times.push(((batch * len) as u64, busy));
    }
    Ok(times)
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

/// The time of a decoding step of `n` sequences (8-token prompts; fewer if some ended at
/// their first token), timed on its third step: what admission starts from before it has
/// measured real ones. Returns the sequences stepped and the time.
fn measure_step(model: &BaseModel, n: usize) -> Result<(usize, Duration)> {
    let params = GenerationParams {
        max_new_tokens: 8,
        ..Default::default()
    };
    let ids: Vec<u32> = (0..8u32).map(|i| 100 + i).collect();
    let prompt = model.llama.embed_ids(&ids)?;
    let joining = (0..n as u64)
        .map(|h| Ok((h, Decoder::new(model, &prompt, &params)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut batch = DecodeBatch::new(model);
    for (_, joined) in batch.join(model, joining, 4096) {
        joined?;
    }
    let mut took = (0, Duration::ZERO);
    for _ in 0..3 {
        let (members, started) = (batch.len(), Instant::now());
        for (h, finished) in batch.step(model)? {
            if finished {
                batch.leave(h)?;
            }
        }
        took = (members, started.elapsed());
    }
    Ok(took)
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
        let c = model.config();
        let admission = Admission::new(AdmissionConfig {
            max_wait: cfg.max_queue_wait,
            max_first_token_wait: cfg.max_first_token_wait,
            max_generations: cfg.max_generations.max(1),
            kv_cache_bytes: cfg.kv_cache_bytes,
            kv_bytes_per_token: c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4,
            prefill_slice: cfg.prefill_slice,
            max_batch_tokens: cfg.max_batch_tokens,
        });
        let pace = admission.clone();
        let alive = Arc::new(AtomicBool::new(true));
        let fault = Arc::new(AtomicBool::new(false));
        let (up, armed) = (alive.clone(), fault.clone());
        let guard = AliveGuard(alive.clone());
        // The pace admission starts from is this machine's, measured before the first
        // request: prefill, and decoding steps of one and of eight sequences.
        pace.calibrate_prefill(&measure_prefill(&model)?);
        for n in [1, 8] {
            let (stepped, took) = measure_step(&model, n)?;
            pace.record_step(stepped, took);
        }
        tracing::info!(
            prefill_tokens_per_second = pace.pace(),
            prefill_fixed_ms = pace.prefill_fixed_seconds() * 1e3,
            step_1_ms = pace.step_seconds(1) * 1e3,
            step_8_ms = pace.step_seconds(8) * 1e3,
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
        let (load, sequences) = (work_load(&groups, &params), sequence_count(&groups));
        let ticket = self
            .admission
            .settle(reservation, load, sequences as u64)
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
            ticket,
        };
        if self.tx.send(work).is_err() {
            self.metrics.queue_depth.dec();
            return Err(EngineError::Failed(
                "the inference thread has stopped".into(),
            ));
        }
        Ok(Submitted { reply: rx })
    }
}

/// Work in the engine: its answer, once it comes (the work holds its admission ticket).
pub struct Submitted {
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
    let mut generations = Generations::new(model, cfg.prefix_cache_bytes);
    // Declared after the work it guards, so it drops first when a panic unwinds: /ready
    // says the engine is down before any failed reply goes out.
    let _down = DownOnPanic(alive);
    let mut engine = Iteration {
        model,
        cfg,
        metrics,
        pace,
        fault,
    };
    while engine.run_once(queue, &mut flights, &mut generations) {}
}

/// What one engine iteration works with.
struct Iteration<'a> {
    model: &'a BaseModel,
    cfg: &'a EngineConfig,
    metrics: &'a crate::infer::EngineMetrics,
    pace: &'a Admission,
    fault: &'a AtomicBool,
}

impl Iteration<'_> {
    /// One iteration: the head sequences that came in (answered at once), one slice of
    /// generation prompts, one decoding step, then the generations' answers. Waits for
    /// work only when there is nothing else to do; `false` once every sender is gone.
    fn run_once(
        &mut self,
        queue: &mut Queue,
        flights: &mut Flights,
        generations: &mut Generations,
    ) -> bool {
        let (model, cfg, metrics, pace) = (self.model, self.cfg, self.metrics, self.pace);
        // 1. Intake: wait only when there is nothing else to do.
        let idle = flights.is_empty() && generations.is_empty();
        let Some(intake) = queue.take(idle, cfg.max_batch_tokens, metrics, || pace.preparing())
        else {
            return false;
        };

        // 2. Every head sequence of the intake in shared forwards; generations queue for
        //    their prefill.
        if !intake.is_empty() {
            let started = Instant::now();
            let n_seqs: usize = intake.iter().map(Work::sequences).sum();
            let head_tokens: usize = intake.iter().map(Work::head_tokens).sum();
            metrics.batch_size.observe(n_seqs as f64);
            let predictions = executor::heads(model, cfg, &intake);
            if head_tokens > 0 {
                pace.record_prefill(head_tokens as u64, started.elapsed());
            }
            for (work, outcome) in intake.into_iter().zip(predictions) {
                let id = flights.insert(work, outcome, started, n_seqs);
                let Some(f) = flights.get_mut(id).filter(|f| f.failure.is_none()) else {
                    continue;
                };
                f.work.ticket.heads_done();
                match generations.start(model, id, &mut f.work) {
                    Ok(open) => f.open_generations = open,
                    Err(e) => f.failure = Some(e),
                }
            }
            // Head requests are complete now: answered before this iteration's slice and
            // step, which would otherwise add up to a slice's time to each of them.
            for id in flights.finish() {
                generations.forget(id);
            }
        }

        // 3. One slice of generation prompts; those done join the decoding batch with
        //    their first token. Then one token for every generation in one forward.
        generations.drop_unwanted(flights);
        let started = Instant::now();
        let budget = pace.prefill_budget();
        let prefilled = generations.prefill(model, budget, cfg.max_generations.max(1), flights);
        if prefilled > 0 {
            pace.record_slice(prefilled as u64, started.elapsed());
        }
        if generations.decoding() > 0 && self.fault.swap(false, Ordering::SeqCst) {
            panic!("a fault injected through Engine::inject_fault");
        }
        generations.drop_unwanted(flights);
        let (decoding, started) = (generations.decoding(), Instant::now());
        generations.step(model, flights);
        if decoding > 0 {
            pace.record_step(decoding, started.elapsed());
        }
        pace.observe_decoding(generations.steps_left());
        metrics.decoding.set(generations.decoding() as i64);
        metrics
            .decode_cache_bytes
            .set(generations.cache_bytes() as i64);
        let (reused, prefix_bytes) = generations.prefix_reuse();
        metrics.prefix_reused_tokens.inc_by(reused);
        metrics.prefix_cache_bytes.set(prefix_bytes as i64);

        // 4. Answer what is complete; forget what nobody waits for any more.
        for id in flights.finish() {
            generations.forget(id);
        }
        true
    }
}

#[cfg(test)]
mod tests;
