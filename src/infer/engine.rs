//! The prediction engine: a queue drained by one inference thread that batches work across
//! requests. Tags are just embeddings, so sequences with different tags share one padded
//! forward pass. Generations advance one token per iteration, all of them in one batched
//! forward, interleaved with new work, so a long generation never holds up a regression
//! request. Work whose client went away
//! is dropped, before it runs or between tokens.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::DType;
use tokio::sync::{mpsc, oneshot};

use super::admission::{Admission, Refused};
use super::heads::{padded_heads, shared_prefix_heads, Prediction};
use crate::model::{BaseModel, DecodeBatch, Decoder, GenerationParams, Mode, TextStream};
use crate::tags::compose::{common_prefix, Composed};

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

struct Work {
    groups: Vec<Group>,
    params: GenerationParams,
    reply: oneshot::Sender<Reply>,
    /// Streaming: where the one generation's text pieces go (handed to it when it starts).
    stream: Option<TextPieces>,
    enqueued: Instant,
    deadline: Instant,
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

/// Token units of a request (see `admission`): its sequences' tokens.
pub fn work_units(groups: &[Group], params: &GenerationParams) -> u64 {
    groups
        .iter()
        .flat_map(|g| &g.seqs)
        .map(|c| sequence_tokens(c, params))
        .sum::<usize>() as u64
}

impl Work {
    fn padded_tokens(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| &g.seqs)
            .map(Composed::len)
            .max()
            .unwrap_or(0)
            * self.groups.iter().map(|g| g.seqs.len()).sum::<usize>()
    }
}

#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Work>,
    metrics: Arc<crate::infer::EngineMetrics>,
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
        let (tx, mut rx) = mpsc::unbounded_channel();
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
                        run(&model, &cfg, &mut rx, &m, &pace, &armed, &up)
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
    pub async fn predict(&self, groups: Vec<Group>, params: GenerationParams) -> Reply {
        self.submit(groups, params, None)?.wait().await
    }

    /// Queues the groups (or refuses them at once, 429); `stream` receives a generation's
    /// text as it is decoded. Dropping the returned handle abandons the work.
    pub fn submit(
        &self,
        groups: Vec<Group>,
        params: GenerationParams,
        stream: Option<TextPieces>,
    ) -> Result<Submitted, EngineError> {
        let ticket = self
            .admission
            .admit(work_units(&groups, &params))
            .map_err(EngineError::Overloaded)?;
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
    _ticket: super::admission::Ticket,
    reply: oneshot::Receiver<Reply>,
}

impl Submitted {
    pub async fn wait(self) -> Reply {
        self.reply.await.map_err(|_| {
            EngineError::Failed("the inference thread dropped the request".to_string())
        })?
    }
}

/// A request being worked on: head predictions are filled at once, generations one token
/// per engine iteration, interleaved with everything else.
struct InFlight {
    work: Work,
    preds: Vec<Vec<Option<Prediction>>>,
    open_generations: usize,
    failure: Option<String>,
    started: Instant,
    batch_size: usize,
}

/// Where a generation's answer goes; its decoder lives in the engine's `DecodeBatch`
/// under the same handle.
struct ActiveGeneration {
    flight: u64,
    group: usize,
    seq: usize,
    /// A streamed generation: its decoded text so far, and where its pieces go (taken
    /// from the work, so the stream ends when the generation does).
    stream: Option<(TextStream, TextPieces)>,
}

/// Serves until every sender is gone. A panic anywhere in here unwinds out of it: the
/// requests in flight (owned by this frame) get their replies dropped, and the supervisor
/// in `Engine::start` restarts it on the same queue.
fn run(
    model: &BaseModel,
    cfg: &EngineConfig,
    rx: &mut mpsc::UnboundedReceiver<Work>,
    metrics: &crate::infer::EngineMetrics,
    pace: &Admission,
    fault: &AtomicBool,
    alive: &AtomicBool,
) {
    let mut pending: Option<Work> = None;
    let mut flights: HashMap<u64, InFlight> = HashMap::new();
    // Generations decoding, by handle: their decoders in `batch`, their answers here.
    let mut batch = DecodeBatch::new(model);
    let mut generations: HashMap<u64, ActiveGeneration> = HashMap::new();
    let mut next_handle = 0u64;
    // Declared after the work it guards, so it drops first when a panic unwinds: /ready
    // says the engine is down before any failed reply goes out.
    let _down = DownOnPanic(alive);
    let mut next_id = 0u64;
    loop {
        // 1. Intake: block only when there is nothing else to do; then take whatever is
        //    already queued, up to the token budget.
        let mut intake = Vec::new();
        if let Some(w) = pending.take() {
            intake.push(w);
        } else if flights.is_empty() {
            match rx.blocking_recv() {
                Some(w) => intake.push(w),
                None => return,
            }
        }
        let mut tokens: usize = intake.iter().map(Work::padded_tokens).sum();
        while let Ok(w) = rx.try_recv() {
            if !intake.is_empty() && tokens + w.padded_tokens() > cfg.max_batch_tokens {
                pending = Some(w);
                break;
            }
            tokens += w.padded_tokens();
            intake.push(w);
        }
        metrics.queue_depth.sub(intake.len() as i64);
        // A client that went away costs nothing more; work past its deadline is answered
        // at once (its client would rather retry than wait on).
        let now = Instant::now();
        intake.retain(|w| !w.reply.is_closed());
        let (late, intake): (Vec<Work>, Vec<Work>) =
            intake.into_iter().partition(|w| now > w.deadline);
        for w in late {
            let _ = w.reply.send(Err(EngineError::Expired(now - w.enqueued)));
        }
        let iteration = Instant::now();
        let mut units = intake
            .iter()
            .flat_map(|w| &w.groups)
            .flat_map(|g| &g.seqs)
            .map(Composed::len)
            .sum::<usize>() as u64;

        // 2. Every head sequence of the intake in shared forwards; generations start.
        let mut joining: Vec<(u64, Decoder)> = Vec::new();
        if !intake.is_empty() {
            let started = Instant::now();
            let n_seqs: usize = intake
                .iter()
                .flat_map(|w| &w.groups)
                .map(|g| g.seqs.len())
                .sum();
            metrics.batch_size.observe(n_seqs as f64);
            // A panic deep in a kernel must fail these requests, not the engine.
            let heads = catch_unwind(AssertUnwindSafe(|| run_heads(model, cfg, &intake)))
                .unwrap_or_else(|_| {
                    intake
                        .iter()
                        .map(|_| Err(anyhow::anyhow!("internal error in the inference engine")))
                        .collect()
                });
            for (mut work, result) in intake.into_iter().zip(heads) {
                let id = next_id;
                next_id += 1;
                let (preds, mut failure) = match result {
                    Ok(p) => (p, None),
                    Err(e) => (Vec::new(), Some(format!("{e:#}"))),
                };
                let mut open = 0;
                for (gi, g) in work.groups.iter().enumerate() {
                    for (si, seq) in g.seqs.iter().enumerate().filter(|(_, s)| s.head.is_none()) {
                        if failure.is_some() {
                            break;
                        }
                        match seq
                            .embed(model, 0)
                            .and_then(|e| Decoder::new(model, &e, &work.params))
                        {
                            Ok(d) => {
                                let handle = next_handle;
                                next_handle += 1;
                                generations.insert(
                                    handle,
                                    ActiveGeneration {
                                        flight: id,
                                        group: gi,
                                        seq: si,
                                        stream: work
                                            .stream
                                            .take()
                                            .map(|tx| (TextStream::new(&work.params), tx)),
                                    },
                                );
                                joining.push((handle, d));
                                open += 1;
                            }
                            Err(e) => failure = Some(format!("{e:#}")),
                        }
                    }
                }
                flights.insert(
                    id,
                    InFlight {
                        work,
                        preds,
                        open_generations: open,
                        failure,
                        started,
                        batch_size: n_seqs,
                    },
                );
            }
        }

        // 3. New generations join the decoding batch in batched prefills (their first
        //    token); then one token for every generation in one batched forward.
        let joined = {
            let handles: Vec<u64> = joining.iter().map(|(h, _)| *h).collect();
            catch_unwind(AssertUnwindSafe(|| {
                batch.join(model, std::mem::take(&mut joining), cfg.max_batch_tokens)
            }))
            .unwrap_or_else(|_| {
                handles
                    .into_iter()
                    .map(|h| {
                        (
                            h,
                            Err(anyhow::anyhow!("internal error in the inference engine")),
                        )
                    })
                    .collect()
            })
        };
        for (handle, result) in joined {
            match result {
                Ok(None) => {}
                Ok(Some(done)) => answer(model, &mut generations, &mut flights, handle, done),
                Err(e) => fail(&mut generations, &mut flights, handle, format!("{e:#}")),
            }
        }
        if !batch.is_empty() && fault.swap(false, Ordering::SeqCst) {
            panic!("a fault injected through Engine::inject_fault");
        }
        // Generations whose request failed or whose client left stop here.
        let dropped: Vec<u64> = generations
            .iter()
            .filter(|(_, g)| {
                !flights
                    .get(&g.flight)
                    .is_some_and(|f| f.failure.is_none() && !f.work.reply.is_closed())
            })
            .map(|(h, _)| *h)
            .collect();
        for h in dropped {
            generations.remove(&h);
            if let Err(e) = batch.leave(h) {
                tracing::error!("leaving the decoding batch: {e:#}");
                for h in batch.clear() {
                    fail(&mut generations, &mut flights, h, format!("{e:#}"));
                }
            }
        }
        units += batch.len() as u64;
        let stepped = catch_unwind(AssertUnwindSafe(|| batch.step(model)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error in the inference engine")));
        match stepped {
            Ok(results) => {
                for (handle, finished) in results {
                    if finished {
                        match batch.leave(handle) {
                            Ok(Some(done)) => {
                                answer(model, &mut generations, &mut flights, handle, done)
                            }
                            Ok(None) => {}
                            Err(e) => {
                                fail(&mut generations, &mut flights, handle, format!("{e:#}"))
                            }
                        }
                        continue;
                    }
                    let (Some(g), Some(d)) = (generations.get_mut(&handle), batch.get(handle))
                    else {
                        continue;
                    };
                    if let Some((text, tx)) = &mut g.stream {
                        match text.next(model, d.ids()) {
                            Ok(Some(piece)) => {
                                let _ = tx.send(piece);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                let msg = format!("{e:#}");
                                if let Some(f) = flights.get_mut(&g.flight) {
                                    f.failure = Some(msg);
                                }
                            }
                        }
                    }
                }
            }
            // A failed step leaves every slot suspect: all its generations fail.
            Err(e) => {
                for h in batch.clear() {
                    fail(&mut generations, &mut flights, h, format!("{e:#}"));
                }
            }
        }
        pace.record(units, iteration.elapsed());
        metrics.decoding.set(batch.len() as i64);
        metrics.decode_cache_bytes.set(batch.cache_bytes() as i64);

        // 4. Answer what is complete; forget what nobody waits for any more.
        let done: Vec<u64> = flights
            .iter()
            .filter(|(_, f)| {
                f.failure.is_some() || f.open_generations == 0 || f.work.reply.is_closed()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let Some(f) = flights.remove(&id) else {
                continue;
            };
            generations.retain(|h, g| {
                let gone = g.flight == id;
                if gone {
                    let _ = batch.leave(*h);
                }
                !gone
            });
            if f.work.reply.is_closed() {
                continue;
            }
            let timings = Timings {
                queue: f.started - f.work.enqueued,
                inference: f.started.elapsed(),
                batch_size: f.batch_size,
            };
            let result = match f.failure {
                Some(e) => Err(EngineError::Failed(e)),
                // No failure and no open generation: every slot should be filled.
                None => f
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
            let _ = f.work.reply.send(result);
        }
    }
}

/// A finished generation's text into its request's answer (and the last piece of its
/// stream).
fn answer(
    model: &BaseModel,
    generations: &mut HashMap<u64, ActiveGeneration>,
    flights: &mut HashMap<u64, InFlight>,
    handle: u64,
    done: Decoder,
) {
    let Some(mut g) = generations.remove(&handle) else {
        return;
    };
    let Some(flight) = flights.get_mut(&g.flight) else {
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
fn fail(
    generations: &mut HashMap<u64, ActiveGeneration>,
    flights: &mut HashMap<u64, InFlight>,
    handle: u64,
    why: String,
) {
    if let Some(f) = generations
        .remove(&handle)
        .and_then(|g| flights.get_mut(&g.flight))
    {
        f.failure = Some(why);
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
            let shared = if heads.len() >= 2 {
                let seqs: Vec<&Composed> = heads.iter().map(|&i| &g.seqs[i]).collect();
                let min_readout = seqs.iter().filter_map(|s| s.readout()).min().unwrap_or(0);
                common_prefix(&seqs).min(min_readout)
            } else {
                0
            };
            if shared >= cfg.min_shared_prefix {
                let seqs: Vec<&Composed> = heads.iter().map(|&i| &g.seqs[i]).collect();
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
