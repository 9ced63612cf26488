//! The three-stage training loop on the differentiable forward. The base model is frozen;
//! only tag vectors (and a function tag's head) are learned.
//!
//! Exact prefix reuse: everything before an example's first learned tag is frozen, so its
//! keys/values are computed once without gradient (fast kernels, KV cache) and only the
//! rest of the sequence is differentiated. Same gradients, a fraction of the work.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::checkpoint::Checkpoint;
use super::data::{slot_input, Dataset, Record};
use super::metrics;
use super::optim::AdamW;
use super::schedule::cosine_with_warmup;
use crate::model::{BaseModel, KvCache, Mode};
use crate::tags::compose::{compose, Piece};
use crate::tags::{Head, HeadSpec, TagBundle, TagKind, TagManifest, TagSet, Template};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    Regression,
    Classification,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Hyperparameters {
    /// Optimizer steps.
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub grad_accum: usize,
    /// Vectors per learned tag (p).
    pub num_vectors: usize,
    pub seed: u64,
    pub weight_decay: f64,
    /// Evaluate every this many steps (0: at the end only).
    pub eval_every: usize,
    /// Stop after this many evaluations without improvement (0: never).
    pub patience: usize,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 8,
            learning_rate: 1e-4,
            warmup_ratio: 0.03,
            grad_accum: 1,
            num_vectors: 10,
            seed: 0,
            weight_decay: 0.0,
            eval_every: 0,
            patience: 0,
        }
    }
}

/// What to learn.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainJob {
    /// 1: domain tags (next-token prediction); 2: a single-domain function tag;
    /// 3: a cross-domain / multi-task function tag.
    pub stage: u8,
    /// The tags being learned: one or more domain tags (stage 1), one function tag (2, 3).
    pub tags: Vec<String>,
    /// e.g. `<Protein>{text}` (stage 1) or `... <SMILES> {smiles} ... <QED>`.
    pub template: String,
    /// The labelled field (stages 2 and 3).
    pub target: Option<String>,
    pub head: HeadKind,
    pub hyperparameters: Hyperparameters,
}

#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub learning_rate: f64,
    /// Latest held-out evaluation.
    pub eval: Option<serde_json::Value>,
    pub best_eval_loss: Option<f64>,
}

/// What a run reports to, and asks of, whoever runs it.
pub trait Hooks {
    /// After every step; returning false cancels the run.
    fn progress(&mut self, p: &Progress) -> bool;
    /// Checkpoint every this many steps (0: only at the end).
    fn every(&self) -> usize {
        0
    }
    fn checkpoint(&mut self, _c: &Checkpoint) -> Result<()> {
        Ok(())
    }
}

/// Hooks from a progress closure alone.
impl<F: FnMut(&Progress) -> bool> Hooks for F {
    fn progress(&mut self, p: &Progress) -> bool {
        self(p)
    }
}

pub struct Trained {
    pub bundles: Vec<TagBundle>,
    pub eval: serde_json::Value,
    pub best_step: usize,
    pub steps_run: usize,
}

/// What a learned tag's head looks like while training.
enum Target {
    Lm,
    Regression { mean: f64, std: f64 },
    Classification { labels: Vec<String> },
    Generation,
}

enum Outputs {
    Lm { logits: Tensor, ids: Tensor },
    Head(Tensor),
}

struct Example {
    /// Unique across the training and evaluation sets: the key of its cached prefix.
    id: usize,
    pieces: Vec<Piece>,
    /// Index of the first learned tag row: everything before it is frozen.
    first_learned: usize,
    /// Position whose hidden state the head reads.
    readout: Option<usize>,
    /// (position, next token id): positions whose logits predict a token.
    lm: Vec<(usize, u32)>,
    value: f64,
    class: u32,
}

pub struct Trainer<'a> {
    model: &'a BaseModel,
    job: TrainJob,
    frozen: Arc<TagSet>,
    target: Target,
    learned: BTreeMap<String, Var>,
    head: Option<(Var, Var)>,
    train: Vec<Example>,
    eval: Vec<Example>,
    eval_values: Vec<f64>,
    /// Keys/values of each example's frozen prefix: they never change during a run, so
    /// after the first epoch a step computes only the part from the learned tag on.
    prefixes: Mutex<PrefixCache>,
}

/// Prefix caches kept within a memory budget (those that do not fit are recomputed).
#[derive(Default)]
struct PrefixCache {
    by_example: HashMap<usize, Arc<KvCache>>,
    bytes: usize,
}

const PREFIX_CACHE_BYTES: usize = 1 << 30;

/// Without an eval set, training data this large gives up 10% for held-out evaluation.
const HOLD_OUT_MIN_EXAMPLES: usize = 10;

/// The paper's initialisation: the mean token embedding, rescaled to the average token
/// norm, repeated `p` times.
pub fn mean_embedding_init(model: &BaseModel, p: usize) -> Result<Tensor> {
    let e = &model.llama.weights().embed;
    let avg_norm = e.sqr()?.sum(1)?.sqrt()?.mean_all()?;
    let mean = e.mean(0)?;
    let mean_norm = mean.sqr()?.sum_all()?.sqrt()?;
    let row = mean.broadcast_mul(&avg_norm.broadcast_div(&mean_norm)?)?;
    Ok(row.unsqueeze(0)?.repeat((p, 1))?)
}

/// A record may carry its own template under this field (multi-task data such as one
/// translation direction per record); the job's template is the default and the one
/// the published tag keeps.
pub const RECORD_TEMPLATE_FIELD: &str = "template";

/// Checks that every record has the slots of its own template (or of the job's), with
/// the error `require_fields` gives.
fn require_slots(
    data: &Dataset,
    templates: &BTreeMap<String, Template>,
    default: &str,
) -> Result<()> {
    for (i, r) in data.records.iter().enumerate() {
        let template = &templates[record_template(r, default)];
        if let Some(missing) = template.slots().into_iter().find(|s| !r.contains_key(*s)) {
            bail!("line {}: missing field `{missing}`", i + 1);
        }
    }
    Ok(())
}

fn record_template<'r>(record: &'r Record, default: &'r str) -> &'r str {
    record
        .get(RECORD_TEMPLATE_FIELD)
        .map_or(default, String::as_str)
}

impl<'a> Trainer<'a> {
    /// Validates the job against the model, the frozen tags and the data, and prepares
    /// every example. Errors are for people: they name the tag, slot, field or line.
    pub fn new(
        model: &'a BaseModel,
        frozen: Arc<TagSet>,
        job: TrainJob,
        data: &Dataset,
        eval: Option<&Dataset>,
    ) -> Result<Self> {
        let h = &job.hyperparameters;
        ensure!((1..=3).contains(&job.stage), "stage must be 1, 2 or 3");
        ensure!(
            h.steps >= 1 && h.batch_size >= 1 && h.grad_accum >= 1,
            "steps, batch_size and grad_accum must be at least 1"
        );
        ensure!(
            h.learning_rate > 0.0 && h.learning_rate.is_finite(),
            "learning_rate must be positive"
        );
        ensure!(
            (0.0..1.0).contains(&h.warmup_ratio),
            "warmup_ratio must be in [0, 1)"
        );
        ensure!(
            (1..=256).contains(&h.num_vectors),
            "num_vectors must be in 1..=256"
        );
        ensure!(!job.tags.is_empty(), "name the tag(s) to learn");
        // Every template the data uses: the job's, and any a record carries itself.
        let mut templates = vec![job.template.clone()];
        for r in data
            .records
            .iter()
            .chain(eval.iter().flat_map(|e| e.records.iter()))
        {
            if let Some(t) = r.get(RECORD_TEMPLATE_FIELD) {
                if !templates.contains(t) {
                    templates.push(t.clone());
                }
            }
        }
        let per_record = templates.len() > 1;
        let parsed: BTreeMap<String, Template> = templates
            .iter()
            .map(|t| (t.clone(), Template::parse(t)))
            .collect();
        for text in &templates {
            let template = &parsed[text];
            let which = if per_record {
                format!("template {text:?}")
            } else {
                "the template".to_string()
            };
            for t in &job.tags {
                ensure!(
                    crate::tags::template::is_valid_tag_name(t),
                    "`{t}` is not a valid tag name"
                );
                ensure!(
                    template.tags().contains(&t.as_str()),
                    "{which} never uses <{t}>"
                );
            }
            for t in template.tags() {
                if !job.tags.iter().any(|l| l == t) {
                    let b = frozen.get(t).with_context(|| {
                        format!("unknown tag <{t}>: train it first or fix the template")
                    })?;
                    ensure!(
                        b.manifest.kind == TagKind::Domain || job.stage == 3,
                        "<{t}> is a function tag; only stage 3 composes with other function tags"
                    );
                }
            }
            let slots = template.slots();
            ensure!(!slots.is_empty(), "{which} has no {{slot}} for the data");
            if let Some(field) = job.target.as_deref() {
                ensure!(
                    !slots.contains(&field),
                    "the target `{field}` must not also be a template slot"
                );
            }
            if job.stage == 2 {
                let domains = template
                    .tags()
                    .iter()
                    .filter(|t| !job.tags.iter().any(|l| l == *t))
                    .count();
                ensure!(
                    domains <= 1,
                    "stage 2 is single-domain: {which} has {domains} other tags (use stage 3)"
                );
            }
        }
        require_slots(data, &parsed, &job.template)?;
        let target = match (job.stage, job.head) {
            (1, HeadKind::None) => {
                ensure!(
                    job.target.is_none(),
                    "stage 1 learns from unlabelled text: no target"
                );
                Target::Lm
            }
            (1, _) => bail!("stage 1 (domain tags) has no head"),
            (_, head) => {
                ensure!(
                    job.tags.len() == 1,
                    "stages 2 and 3 learn exactly one function tag"
                );
                let field = job
                    .target
                    .as_deref()
                    .context("stages 2 and 3 need `target`: the labelled field")?;
                match head {
                    HeadKind::Regression => {
                        let v = data.numeric(field)?;
                        let mean = v.iter().sum::<f64>() / v.len() as f64;
                        let var =
                            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
                        Target::Regression {
                            mean,
                            std: var.sqrt().max(1e-8),
                        }
                    }
                    HeadKind::Classification => Target::Classification {
                        labels: data.labels(field)?,
                    },
                    HeadKind::None => {
                        data.require_fields(&[field])?;
                        Target::Generation
                    }
                }
            }
        };
        // Learned tags join the frozen ones under their names, as placeholders, so that
        // examples compose exactly as they will be served.
        let d = model.config().hidden_size;
        let init = mean_embedding_init(model, h.num_vectors)?;
        let with_head = matches!(
            target,
            Target::Regression { .. } | Target::Classification { .. }
        );
        let mut compose_set = TagSet {
            tags: frozen.tags.clone(),
            errors: BTreeMap::new(),
        };
        let mut learned = BTreeMap::new();
        for t in &job.tags {
            learned.insert(t.clone(), Var::from_tensor(&init)?);
            compose_set.tags.insert(
                t.clone(),
                Arc::new(placeholder(t, h.num_vectors, with_head)),
            );
        }
        let k = match &target {
            Target::Regression { .. } => 1,
            Target::Classification { labels } => labels.len(),
            _ => 0,
        };
        let head = if k > 0 {
            let mut rng = StdRng::seed_from_u64(h.seed);
            let w: Vec<f32> = (0..k * d)
                .map(|_| rand::Rng::random_range(&mut rng, -0.01f32..0.01))
                .collect();
            Some((
                Var::from_vec(w, (k, d), model.device())?,
                Var::zeros(k, DType::F32, model.device())?,
            ))
        } else {
            None
        };
        let mut trainer = Self {
            model,
            job,
            frozen,
            target,
            learned,
            head,
            train: Vec::new(),
            eval: Vec::new(),
            eval_values: Vec::new(),
            prefixes: Mutex::new(PrefixCache::default()),
        };
        trainer.train = trainer.examples(data, &parsed, &compose_set, 0)?;
        match eval {
            Some(e) => {
                require_slots(e, &parsed, &trainer.job.template)?;
                trainer.eval = trainer.examples(e, &parsed, &compose_set, trainer.train.len())?;
            }
            // No held-out set given: hold out a seeded 10% (at most 200) of the training data.
            None if trainer.train.len() >= HOLD_OUT_MIN_EXAMPLES => {
                let n = (trainer.train.len() / 10).clamp(1, 200);
                let mut order: Vec<usize> = (0..trainer.train.len()).collect();
                order.shuffle(&mut StdRng::seed_from_u64(trainer.job.hyperparameters.seed));
                let held: std::collections::HashSet<usize> = order[..n].iter().copied().collect();
                for (i, ex) in std::mem::take(&mut trainer.train).into_iter().enumerate() {
                    if held.contains(&i) {
                        &mut trainer.eval
                    } else {
                        &mut trainer.train
                    }
                    .push(ex);
                }
            }
            None => {}
        }
        trainer.eval_values = trainer.eval.iter().map(|e| e.value).collect();
        Ok(trainer)
    }

    /// `templates`: every template the data uses, parsed (the job's included); the
    /// records' slots are already checked.
    fn examples(
        &self,
        data: &Dataset,
        templates: &BTreeMap<String, Template>,
        set: &TagSet,
        id_base: usize,
    ) -> Result<Vec<Example>> {
        let max = self.model.config().max_position_embeddings;
        let function = (!matches!(self.target, Target::Lm)).then(|| self.job.tags[0].as_str());
        let eos = self.model.tokenizer.eos_ids().first().copied();
        data.records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let template = &templates[record_template(r, &self.job.template)];
                let input = slot_input(r, &template.slots());
                let c = compose(self.model, set, template, &input, function, max)
                    .map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))?;
                let mut pieces = c.pieces.clone();
                let first_learned = pieces
                    .iter()
                    .position(|p| matches!(p, Piece::TagRow { name, .. } if self.learned.contains_key(name)))
                    .expect("the template uses a learned tag");
                let mut ex = Example { id: id_base + i, pieces: Vec::new(), first_learned, readout: c.head.as_ref().map(|(_, p)| *p), lm: Vec::new(), value: 0.0, class: 0 };
                let field = self.job.target.as_deref().unwrap_or("");
                match &self.target {
                    Target::Lm => {
                        // Predict every text token after the first learned tag.
                        for j in first_learned + 1..pieces.len() {
                            if let Piece::Token(id) = pieces[j] {
                                ex.lm.push((j - 1, id));
                            }
                        }
                        ensure!(!ex.lm.is_empty(), "line {}: no text after the tag to learn from", i + 1);
                    }
                    Target::Generation => {
                        let mut ids = self.model.tokenizer.encode_fragment(&r[field])?;
                        ids.extend(eos);
                        for id in ids {
                            ex.lm.push((pieces.len() - 1, id));
                            pieces.push(Piece::Token(id));
                        }
                        pieces.pop(); // the last target token is predicted, never read
                    }
                    Target::Regression { .. } => {
                        ex.value = r[field].trim().parse().context("validated as numeric")?;
                    }
                    Target::Classification { labels } => {
                        ex.class = labels.iter().position(|l| *l == r[field]).unwrap_or(0) as u32;
                    }
                }
                ensure!(pieces.len() <= max, "line {}: {} positions exceed the model's context {max}", i + 1, pieces.len());
                ex.pieces = pieces;
                Ok(ex)
            })
            .collect()
    }

    /// Embeddings of `pieces`, learned rows from the current variables.
    fn embed(&self, pieces: &[Piece]) -> Result<Tensor> {
        let mut parts = Vec::new();
        let mut ids = Vec::new();
        for p in pieces {
            match p {
                Piece::Token(id) => ids.push(*id),
                Piece::TagRow { name, row, .. } => {
                    if !ids.is_empty() {
                        parts.push(self.model.llama.embed_ids(&std::mem::take(&mut ids))?);
                    }
                    let rows = match self.learned.get(name) {
                        Some(v) => v.as_tensor().narrow(0, *row, 1)?,
                        None => self
                            .frozen
                            .get(name)
                            .context("frozen tag vanished")?
                            .vectors
                            .narrow(0, *row, 1)?,
                    };
                    parts.push(rows);
                }
            }
        }
        if !ids.is_empty() {
            parts.push(self.model.llama.embed_ids(&ids)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Right-padded `[b, longest, d]` embeddings of `pieces[start_i..end_i]` and the mask.
    fn padded(&self, spans: &[&[Piece]]) -> Result<(Tensor, Tensor)> {
        let d = self.model.config().hidden_size;
        let longest = spans.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut rows = Vec::new();
        let mut mask = Vec::new();
        for s in spans {
            let e = if s.is_empty() {
                Tensor::zeros((0, d), DType::F32, self.model.device())?
            } else {
                self.embed(s)?
            };
            let pad = longest - s.len();
            rows.push(if pad > 0 {
                Tensor::cat(
                    &[
                        &e,
                        &Tensor::zeros((pad, d), DType::F32, self.model.device())?,
                    ],
                    0,
                )?
            } else {
                e
            });
            mask.extend(std::iter::repeat_n(1u8, s.len()).chain(std::iter::repeat_n(0u8, pad)));
        }
        Ok((
            Tensor::stack(&rows, 0)?,
            Tensor::from_vec(mask, (spans.len(), longest), self.model.device())?,
        ))
    }

    /// Final-norm hidden states of the part of each example from its first learned tag on
    /// (`[b, s, d]`, row `i` starting at `batch[i].first_learned`). The frozen prefix runs
    /// once without gradient when `reuse_prefix`; otherwise everything is differentiated.
    fn forward(
        &self,
        batch: &[&Example],
        mode: Mode,
        reuse_prefix: bool,
    ) -> Result<(Tensor, Vec<usize>)> {
        let llama = &self.model.llama;
        if reuse_prefix && batch.iter().any(|e| e.first_learned > 0) {
            let mut caches: HashMap<usize, Arc<KvCache>> = HashMap::new();
            let missing: Vec<&&Example> = {
                let kept = self.prefixes.lock().expect("prefix cache lock");
                batch
                    .iter()
                    .filter(|e| match kept.by_example.get(&e.id) {
                        Some(c) => {
                            caches.insert(e.id, c.clone());
                            false
                        }
                        None => true,
                    })
                    .collect()
            };
            if !missing.is_empty() {
                let prefixes: Vec<&[Piece]> = missing
                    .iter()
                    .map(|e| &e.pieces[..e.first_learned])
                    .collect();
                let (x, m) = self.padded(&prefixes)?;
                let mut cache: KvCache = llama.new_cache();
                llama.forward(&x, Some(&m), Some(&mut cache), Mode::Fast)?;
                let mut kept = self.prefixes.lock().expect("prefix cache lock");
                for (e, c) in missing.iter().zip(cache.split()?) {
                    let c = Arc::new(c);
                    if kept.bytes + c.bytes() <= PREFIX_CACHE_BYTES {
                        kept.bytes += c.bytes();
                        kept.by_example.insert(e.id, c.clone());
                    }
                    caches.insert(e.id, c);
                }
            }
            let ordered: Vec<&KvCache> = batch.iter().map(|e| caches[&e.id].as_ref()).collect();
            let mut cache = KvCache::stack(&ordered, llama)?;
            let suffixes: Vec<&[Piece]> =
                batch.iter().map(|e| &e.pieces[e.first_learned..]).collect();
            let (x, m) = self.padded(&suffixes)?;
            let h = llama.forward(&x, Some(&m), Some(&mut cache), mode)?;
            Ok((h, batch.iter().map(|e| e.first_learned).collect()))
        } else {
            let full: Vec<&[Piece]> = batch.iter().map(|e| &e.pieces[..]).collect();
            let (x, m) = self.padded(&full)?;
            Ok((
                llama.forward(&x, Some(&m), None, mode)?,
                vec![0; batch.len()],
            ))
        }
    }

    /// What the model says for a batch: LM logits with their target ids, or head outputs.
    fn outputs(&self, batch: &[&Example], mode: Mode, reuse_prefix: bool) -> Result<Outputs> {
        let (h, offsets) = self.forward(batch, mode, reuse_prefix)?;
        let (b, s, d) = h.dims3()?;
        let flat = h.reshape((b * s, d))?;
        let rows = |rows: Vec<u32>| -> Result<Tensor> {
            let idx = Tensor::from_vec(rows.clone(), rows.len(), h.device())?;
            Ok(flat.index_select(&idx, 0)?)
        };
        Ok(match &self.target {
            Target::Lm | Target::Generation => {
                let (at, ids): (Vec<u32>, Vec<u32>) = batch
                    .iter()
                    .enumerate()
                    .flat_map(|(i, e)| {
                        let (row0, off) = (i * s, offsets[i]);
                        e.lm.iter()
                            .map(move |&(p, id)| ((row0 + p - off) as u32, id))
                    })
                    .unzip();
                let n = ids.len();
                Outputs::Lm {
                    logits: self.model.llama.logits(&rows(at)?)?,
                    ids: Tensor::from_vec(ids, n, h.device())?,
                }
            }
            _ => {
                let at = batch
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (i * s + e.readout.expect("head readout") - offsets[i]) as u32)
                    .collect();
                Outputs::Head(self.head_out(&rows(at)?)?)
            }
        })
    }

    /// Mean loss over the batch's examples (or predicted tokens).
    fn loss(&self, batch: &[&Example], out: &Outputs) -> Result<Tensor> {
        let device = self.model.device();
        Ok(match (out, &self.target) {
            (Outputs::Lm { logits, ids }, _) => candle_nn::loss::cross_entropy(logits, ids)?,
            (Outputs::Head(o), Target::Regression { mean, std }) => {
                let z: Vec<f32> = batch
                    .iter()
                    .map(|e| ((e.value - mean) / std) as f32)
                    .collect();
                (o.squeeze(1)? - Tensor::from_vec(z, batch.len(), device)?)?
                    .sqr()?
                    .mean_all()?
            }
            (Outputs::Head(o), _) => {
                let labels: Vec<u32> = batch.iter().map(|e| e.class).collect();
                candle_nn::loss::cross_entropy(o, &Tensor::from_vec(labels, batch.len(), device)?)?
            }
        })
    }

    fn head_out(&self, hidden: &Tensor) -> Result<Tensor> {
        let (w, bias) = self.head.as_ref().context("no head")?;
        Ok(hidden
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(bias.as_tensor())?)
    }

    fn vars(&self) -> Vec<Var> {
        let mut v: Vec<Var> = self.learned.values().cloned().collect();
        if let Some((w, b)) = &self.head {
            v.push(w.clone());
            v.push(b.clone());
        }
        v
    }

    /// Gradients of the loss of `batch` with respect to every learned parameter, by
    /// differentiating either the whole sequence or only the part after the frozen prefix.
    pub fn gradients(&self, batch_idx: &[usize], reuse_prefix: bool) -> Result<Vec<Tensor>> {
        let batch: Vec<&Example> = batch_idx.iter().map(|&i| &self.train[i]).collect();
        let loss = self.loss(
            &batch,
            &self.outputs(&batch, Mode::Differentiable, reuse_prefix)?,
        )?;
        self.grads_of(&loss)
    }

    /// Gradients of `loss` with respect to every learned parameter, in `vars()` order.
    fn grads_of(&self, loss: &Tensor) -> Result<Vec<Tensor>> {
        let grads = loss.backward()?;
        self.vars()
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .context("a learned parameter got no gradient")
            })
            .collect()
    }

    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// Held-out evaluation: the loss and the metrics that fit the task.
    pub fn evaluate(&self) -> Result<(f64, serde_json::Value)> {
        if self.eval.is_empty() {
            return Ok((f64::NAN, serde_json::Value::Null));
        }
        let mut total = 0.0;
        let mut preds = Vec::new();
        let mut correct = 0usize;
        for chunk in self.eval.chunks(self.job.hyperparameters.batch_size.max(8)) {
            let batch: Vec<&Example> = chunk.iter().collect();
            let out = self.outputs(&batch, Mode::Fast, true)?;
            total += self.loss(&batch, &out)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            match (&out, &self.target) {
                (Outputs::Head(o), Target::Regression { mean, std }) => {
                    preds.extend(
                        o.flatten_all()?
                            .to_vec1::<f32>()?
                            .iter()
                            .map(|z| *z as f64 * std + mean),
                    );
                }
                (Outputs::Head(o), _) => {
                    let best: Vec<u32> = o.argmax(D::Minus1)?.to_vec1()?;
                    correct += best
                        .iter()
                        .zip(chunk)
                        .filter(|(p, e)| **p == e.class)
                        .count();
                }
                _ => {}
            }
        }
        let loss = total / self.eval.len() as f64;
        let n = self.eval.len();
        let mut m = match &self.target {
            Target::Regression { .. } => {
                serde_json::to_value(metrics::regression(&preds, &self.eval_values))?
            }
            Target::Classification { .. } => {
                serde_json::json!({"accuracy": correct as f64 / n as f64, "n": n})
            }
            Target::Lm | Target::Generation => {
                serde_json::json!({"perplexity": loss.exp(), "n": n})
            }
        };
        m["loss"] = serde_json::json!(loss);
        Ok((loss, m))
    }

    /// The examples of optimizer step `step`: a deterministic function of the seed and the
    /// step, so a resumed run sees exactly the batches an uninterrupted one would.
    fn batch_for(&self, step: usize, micro: usize) -> Vec<usize> {
        let h = &self.job.hyperparameters;
        let n = self.train.len();
        let first = (step * h.grad_accum + micro) * h.batch_size;
        (first..first + h.batch_size)
            .map(|draw| {
                let epoch = (draw / n) as u64;
                let mut perm: Vec<usize> = (0..n).collect();
                perm.shuffle(&mut StdRng::seed_from_u64(
                    h.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch,
                ));
                perm[draw % n]
            })
            .collect()
    }

    /// Runs (or, from `resume`, continues) the optimisation. `hooks.progress` is called
    /// after every step (returning false cancels the run); `hooks.checkpoint` every
    /// `hooks.every` steps and at the end.
    pub fn run(mut self, resume: Option<Checkpoint>, hooks: &mut dyn Hooks) -> Result<Trained> {
        let h = self.job.hyperparameters.clone();
        let mut opt = AdamW::new(self.vars(), h.learning_rate, h.weight_decay)?;
        let mut best: Option<(f64, usize, Vec<Tensor>)> = None;
        let mut evals_without_gain = 0;
        let mut first_step = 0;
        if let Some(c) = resume {
            self.restore(&c.params)?;
            opt.restore(c.adam_t, c.adam_m, c.adam_v)?;
            best = c.best;
            evals_without_gain = c.evals_without_gain;
            first_step = c.step;
        }
        let mut last_eval = None;
        let mut steps_run = first_step;
        let stopped_early = |ewg: usize| h.patience > 0 && ewg >= h.patience;
        for step in first_step..h.steps {
            if stopped_early(evals_without_gain) {
                break;
            }
            let lr = cosine_with_warmup(step, h.steps, h.warmup_ratio, h.learning_rate);
            opt.lr = lr;
            let mut sums: Option<Vec<Tensor>> = None;
            let mut loss_sum = 0.0;
            for micro in 0..h.grad_accum {
                let batch = self.batch_for(step, micro);
                let examples: Vec<&Example> = batch.iter().map(|&i| &self.train[i]).collect();
                let loss = self.loss(
                    &examples,
                    &self.outputs(&examples, Mode::Differentiable, true)?,
                )?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                let g = self.grads_of(&loss)?;
                sums = Some(match sums {
                    None => g,
                    Some(prev) => prev
                        .iter()
                        .zip(&g)
                        .map(|(a, b)| a + b)
                        .collect::<candle_core::Result<_>>()?,
                });
            }
            let grads = sums
                .expect("grad_accum >= 1")
                .into_iter()
                .map(|g| g / h.grad_accum as f64)
                .collect::<candle_core::Result<Vec<_>>>()?;
            opt.step(&grads)?;
            steps_run = step + 1;
            let loss = loss_sum / h.grad_accum as f64;
            ensure!(
                loss.is_finite(),
                "the loss diverged at step {steps_run} (try a lower learning_rate)"
            );
            let eval_now =
                steps_run == h.steps || (h.eval_every > 0 && steps_run % h.eval_every == 0);
            if eval_now && !self.eval.is_empty() {
                let (eval_loss, m) = self.evaluate()?;
                last_eval = Some(m);
                if best.as_ref().is_none_or(|(b, _, _)| eval_loss < *b) {
                    best = Some((eval_loss, steps_run, self.snapshot()?));
                    evals_without_gain = 0;
                } else {
                    evals_without_gain += 1;
                }
            }
            let progress = Progress {
                step: steps_run,
                total_steps: h.steps,
                loss,
                learning_rate: lr,
                eval: last_eval.clone(),
                best_eval_loss: best.as_ref().map(|b| b.0),
            };
            if !hooks.progress(&progress) {
                bail!("cancelled at step {steps_run}");
            }
            let every = hooks.every();
            if (every > 0 && steps_run % every == 0)
                || steps_run == h.steps
                || stopped_early(evals_without_gain)
            {
                let (t, m, v) = opt.state();
                hooks.checkpoint(&Checkpoint {
                    step: steps_run,
                    params: self.snapshot()?,
                    adam_t: t,
                    adam_m: m.to_vec(),
                    adam_v: v.to_vec(),
                    best: best.clone(),
                    evals_without_gain,
                })?;
            }
        }
        let best_step = match best {
            Some((_, step, snapshot)) => {
                self.restore(&snapshot)?;
                step
            }
            None => steps_run,
        };
        let (_, eval) = self.evaluate()?;
        let bundles = self.bundles(&eval, best_step, steps_run)?;
        Ok(Trained {
            bundles,
            eval,
            best_step,
            steps_run,
        })
    }

    fn snapshot(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .vars()
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?)
    }

    fn restore(&mut self, snapshot: &[Tensor]) -> Result<()> {
        for (v, t) in self.vars().iter().zip(snapshot) {
            v.set(t)?;
        }
        Ok(())
    }

    fn bundles(
        &self,
        eval: &serde_json::Value,
        best_step: usize,
        steps_run: usize,
    ) -> Result<Vec<TagBundle>> {
        let d = self.model.config().hidden_size;
        let template = Template::parse(&self.job.template);
        let head_spec = match &self.target {
            Target::Regression { mean, std } => Some(HeadSpec::Regression {
                target_mean: *mean,
                target_std: *std,
            }),
            Target::Classification { labels } => Some(HeadSpec::Classification {
                labels: labels.clone(),
            }),
            _ => None,
        };
        self.learned
            .iter()
            .map(|(name, var)| {
                let version = self.frozen.get(name).map_or(1, |b| b.version() + 1);
                let is_function = self.job.stage > 1;
                let head = match (&self.head, &head_spec) {
                    (Some((w, b)), Some(spec)) => Some(Head { spec: spec.clone(), weight: w.as_tensor().copy()?, bias: b.as_tensor().copy()? }),
                    _ => None,
                };
                Ok(TagBundle {
                    manifest: TagManifest {
                        name: name.clone(),
                        kind: if is_function { TagKind::Function } else { TagKind::Domain },
                        version,
                        num_vectors: var.as_tensor().dim(0)?,
                        hidden_size: d,
                        base_model: self.model.fingerprint.clone(),
                        head: head_spec.clone(),
                        template: is_function.then(|| self.job.template.clone()),
                        domain_tags: template.tags().iter().filter(|t| *t != name).map(|t| t.to_string()).collect(),
                        tensors_sha256: None,
                        provenance: serde_json::json!({
                            "stage": self.job.stage,
                            "template": self.job.template,
                            "target": self.job.target,
                            "head": self.job.head,
                            "hyperparameters": self.job.hyperparameters,
                            "train_examples": self.train.len(),
                            "eval_examples": self.eval.len(),
                            "steps_run": steps_run,
                            "best_step": best_step,
                            "frozen_tags": template.tags().iter().filter(|t| !self.learned.contains_key(**t))
                                .map(|t| (t.to_string(), self.frozen.get(t).map_or(0, |b| b.version()))).collect::<HashMap<_, _>>(),
                        }),
                        metrics: eval.clone(),
                    },
                    vectors: var.as_tensor().copy()?,
                    head,
                    source: "bundle",
                })
            })
            .collect()
    }
}

/// A stand-in for a tag being learned, so that examples compose exactly as they will be
/// served: right name and length, and a head where one will be read.
fn placeholder(name: &str, p: usize, with_head: bool) -> TagBundle {
    let zeros = |shape: (usize, usize)| {
        Tensor::zeros(shape, DType::F32, &Device::Cpu).expect("small zeros")
    };
    let head = with_head.then(|| Head {
        spec: HeadSpec::Regression {
            target_mean: 0.0,
            target_std: 1.0,
        },
        weight: zeros((1, 1)),
        bias: zeros((1, 1)).flatten_all().expect("1 element"),
    });
    TagBundle {
        manifest: TagManifest {
            name: name.into(),
            kind: TagKind::Function,
            version: 0,
            num_vectors: p,
            hidden_size: 1,
            base_model: String::new(),
            head: head.as_ref().map(|h| h.spec.clone()),
            template: None,
            domain_tags: vec![],
            tensors_sha256: None,
            provenance: serde_json::Value::Null,
            metrics: serde_json::Value::Null,
        },
        vectors: zeros((p, 1)),
        head,
        source: "training",
    }
}
