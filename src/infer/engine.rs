//! The prediction engine: a queue drained by one inference thread that batches work across
//! requests. Tags are just embeddings, so sequences with different tags share one padded
//! forward pass. Work whose client went away is dropped before it runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{DType, Tensor};
use tokio::sync::{mpsc, oneshot};

use super::compose::{common_prefix, Composed};
use super::heads::{apply_head, Prediction};
use crate::model::{generate, rows_at, BaseModel, GenerationParams, Mode};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Padded tokens (batch x longest sequence) per forward pass.
    pub max_batch_tokens: usize,
    /// A shared prefix at least this long is computed once for several functions.
    pub min_shared_prefix: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 4096,
            min_shared_prefix: 8,
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

pub type Reply = Result<(Vec<Vec<Prediction>>, Timings), String>;

struct Work {
    groups: Vec<Group>,
    params: GenerationParams,
    reply: oneshot::Sender<Reply>,
    enqueued: Instant,
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
}

impl Engine {
    pub fn start(
        model: Arc<BaseModel>,
        cfg: EngineConfig,
        metrics: Arc<crate::infer::EngineMetrics>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || run(model, cfg, rx, m))?;
        Ok(Self { tx, metrics })
    }

    /// Queues the groups and waits for one list of predictions per group.
    pub async fn predict(&self, groups: Vec<Group>, params: GenerationParams) -> Reply {
        let (reply, rx) = oneshot::channel();
        self.metrics.queue_depth.inc();
        let work = Work {
            groups,
            params,
            reply,
            enqueued: Instant::now(),
        };
        if self.tx.send(work).is_err() {
            self.metrics.queue_depth.dec();
            return Err("the inference thread has stopped".into());
        }
        rx.await
            .map_err(|_| "the inference thread dropped the request".to_string())?
    }
}

fn run(
    model: Arc<BaseModel>,
    cfg: EngineConfig,
    mut rx: mpsc::UnboundedReceiver<Work>,
    metrics: Arc<crate::infer::EngineMetrics>,
) {
    let mut pending: Option<Work> = None;
    loop {
        let first = match pending.take() {
            Some(w) => w,
            None => match rx.blocking_recv() {
                Some(w) => w,
                None => return,
            },
        };
        // Take whatever else is already queued, up to the token budget.
        let mut batch = vec![first];
        let mut tokens = batch[0].padded_tokens();
        while let Ok(w) = rx.try_recv() {
            if tokens + w.padded_tokens() > cfg.max_batch_tokens {
                pending = Some(w);
                break;
            }
            tokens += w.padded_tokens();
            batch.push(w);
        }
        metrics.queue_depth.sub(batch.len() as i64);
        // A client that went away costs nothing more.
        batch.retain(|w| !w.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let n_seqs: usize = batch
            .iter()
            .flat_map(|w| &w.groups)
            .map(|g| g.seqs.len())
            .sum();
        metrics.batch_size.observe(n_seqs as f64);
        let results = run_batch(&model, &cfg, &batch);
        let inference = started.elapsed();
        for (work, result) in batch.into_iter().zip(results) {
            let timings = Timings {
                queue: started - work.enqueued,
                inference,
                batch_size: n_seqs,
            };
            let _ = work
                .reply
                .send(result.map(|p| (p, timings)).map_err(|e| format!("{e:#}")));
        }
    }
}

/// Runs every sequence of every work item; returns per item, per group, per sequence.
fn run_batch(
    model: &BaseModel,
    cfg: &EngineConfig,
    batch: &[Work],
) -> Vec<Result<Vec<Vec<Prediction>>>> {
    // Head sequences of all items go through shared padded forwards; groups with a long
    // common prefix go through the prefix path; generation runs per sequence.
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
                let min_readout = seqs
                    .iter()
                    .map(|s| s.head.as_ref().unwrap().1)
                    .min()
                    .unwrap();
                common_prefix(&seqs).min(min_readout)
            } else {
                0
            };
            if shared >= cfg.min_shared_prefix {
                match shared_prefix_heads(model, g, &heads, shared) {
                    Ok(preds) => heads
                        .iter()
                        .zip(preds)
                        .for_each(|(&i, p)| out[wi][gi][i] = Some(p)),
                    Err(e) => failures[wi] = Some(e),
                }
            } else {
                plain.extend(heads.iter().map(|&i| (wi, gi, i)));
            }
            for (si, seq) in g.seqs.iter().enumerate().filter(|(_, s)| s.head.is_none()) {
                match seq
                    .embed(model, 0)
                    .and_then(|e| generate(model, &e, &w.params))
                {
                    Ok(g) => {
                        out[wi][gi][si] = Some(Prediction::Text {
                            text: g.text,
                            ids: g.ids,
                            finish_reason: g.finish_reason,
                        })
                    }
                    Err(e) => failures[wi] = Some(e),
                }
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
            None => Ok(groups
                .into_iter()
                .map(|g| {
                    g.into_iter()
                        .map(|p| p.expect("every sequence ran"))
                        .collect()
                })
                .collect()),
        })
        .collect()
}

fn batch_seq(batch: &[Work], (wi, gi, si): (usize, usize, usize)) -> &Composed {
    &batch[wi].groups[gi].seqs[si]
}

/// Right-pads `seqs` into one forward and applies each one's head at its readout.
fn padded_heads(model: &BaseModel, seqs: &[&Composed]) -> Result<Vec<Prediction>> {
    let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let (rows, mask) = pad_right(model, seqs, 0, longest)?;
    let hidden = model.llama.forward(&rows, Some(&mask), None, Mode::Fast)?;
    let readouts: Vec<usize> = seqs.iter().map(|s| s.head.as_ref().unwrap().1).collect();
    read_heads(seqs, &rows_at(&hidden, &readouts)?)
}

/// The common prefix once (batch 1, cached), then every suffix in one padded batch.
fn shared_prefix_heads(
    model: &BaseModel,
    g: &Group,
    idx: &[usize],
    shared: usize,
) -> Result<Vec<Prediction>> {
    let seqs: Vec<&Composed> = idx.iter().map(|&i| &g.seqs[i]).collect();
    let prefix = seqs[0]
        .embed(model, 0)?
        .narrow(0, 0, shared)?
        .unsqueeze(0)?;
    let mut cache = model.llama.new_cache();
    model
        .llama
        .forward(&prefix, None, Some(&mut cache), Mode::Fast)?;
    let mut cache = cache.repeat(seqs.len())?;
    let longest = seqs.iter().map(|s| s.len() - shared).max().unwrap_or(0);
    let (rows, mask) = pad_right(model, &seqs, shared, longest)?;
    let hidden = model
        .llama
        .forward(&rows, Some(&mask), Some(&mut cache), Mode::Fast)?;
    let readouts: Vec<usize> = seqs
        .iter()
        .map(|s| s.head.as_ref().unwrap().1 - shared)
        .collect();
    read_heads(&seqs, &rows_at(&hidden, &readouts)?)
}

fn pad_right(
    model: &BaseModel,
    seqs: &[&Composed],
    start: usize,
    longest: usize,
) -> Result<(Tensor, Tensor)> {
    let d = model.config().hidden_size;
    let mut rows = Vec::with_capacity(seqs.len());
    let mut mask = Vec::with_capacity(seqs.len() * longest);
    for s in seqs {
        let e = s.embed(model, start)?;
        let n = e.dim(0)?;
        let pad = longest - n;
        rows.push(if pad > 0 {
            Tensor::cat(&[&e, &Tensor::zeros((pad, d), DType::F32, e.device())?], 0)?
        } else {
            e
        });
        mask.extend(std::iter::repeat_n(1u8, n).chain(std::iter::repeat_n(0u8, pad)));
    }
    let mask = Tensor::from_vec(mask, (seqs.len(), longest), model.device())?;
    Ok((Tensor::stack(&rows, 0)?, mask))
}

fn read_heads(seqs: &[&Composed], hidden: &Tensor) -> Result<Vec<Prediction>> {
    seqs.iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(apply_head(s.head().expect("head sequence"), &hidden.narrow(0, i, 1)?)?.remove(0))
        })
        .collect()
}
