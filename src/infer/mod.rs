//! The prediction side: the batching engine, heads, and the `predict` entry point the
//! HTTP layer calls.

pub mod admission;
pub mod engine;
mod executor;
pub mod heads;
pub mod metrics;
pub mod request;
pub mod scheduler;
pub mod work;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

pub use crate::tags::compose::{compose, ComposeError, Composed, Input};
pub use engine::{Engine, EngineConfig, EngineError, Group, Timings};
pub use heads::Prediction;
pub use metrics::{EngineMetrics, TagMetrics};
pub use request::{
    Parameters, PredictRequest, PredictResponse, PredictionEntry, Prompt, Request, Usage,
};

use crate::model::{BaseModel, GenerationParams};
use crate::tags::{Registry, TagKind, Template};

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("{0}")]
    Validation(String),
    #[error("inference failed: {0}")]
    Backend(String),
    /// Not admitted (429): the queue holds more work than its wait budget.
    #[error("{0}")]
    Overloaded(admission::Refused),
    /// Admitted but not started in time (503).
    #[error("{0}")]
    Expired(String),
}

impl From<EngineError> for PredictError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded(r) => Self::Overloaded(r),
            EngineError::Expired(_) => Self::Expired(e.to_string()),
            EngineError::Failed(m) => Self::Backend(m),
        }
    }
}

fn invalid(msg: impl Into<String>) -> PredictError {
    PredictError::Validation(msg.into())
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_input_tokens: usize,
    pub max_batch_inputs: usize,
    pub max_new_tokens: usize,
    /// Tokens a request's generations may hold in the KV cache at once (prompt +
    /// max_new_tokens, summed over its generated sequences): generations run side by side,
    /// so this bounds one request's memory (~46 KB per token on the default model).
    pub max_generation_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_input_tokens: 1024,
            max_batch_inputs: 256,
            max_new_tokens: 512,
            max_generation_tokens: 16384,
        }
    }
}

pub struct Predictor {
    pub model: Arc<BaseModel>,
    pub registry: Arc<Registry>,
    pub engine: Engine,
    pub engine_config: EngineConfig,
    pub limits: Limits,
    /// The most bytes of text that one token can stand for (an upper bound): an input
    /// longer than a prompt of `max_input_tokens` such tokens is refused before it is
    /// tokenised (a 1 MB input took ~500 ms to tokenise and then be refused).
    max_token_bytes: usize,
    tag_metrics: Arc<TagMetrics>,
    /// Keeps the tags-directory watcher alive while the predictor lives.
    _watcher: Option<crate::tags::TagsWatch>,
}

/// A function's template and the tag whose head it reads (none: generation).
type Plan = (Template, Option<String>);

/// A request checked and composed, ready for the engine.
struct Prepared {
    groups: Vec<Group>,
    params: GenerationParams,
    answer: Answer,
}

/// How the engine's predictions become the response.
struct Answer {
    /// With `functions`: the function names, in request order.
    names: Option<Vec<String>>,
    versions: BTreeMap<String, u64>,
    /// Prompt tokens per function (summed over the inputs), in request order.
    prompt_tokens: Vec<usize>,
    observed: Observed,
}

impl Answer {
    fn respond(self, preds: Vec<Vec<Prediction>>) -> PredictResponse {
        let names = self.names;
        let mut completion_tokens = vec![0; self.prompt_tokens.len()];
        for per_fn in &preds {
            for (count, p) in completion_tokens.iter_mut().zip(per_fn) {
                if let Prediction::Text { ids, .. } = p {
                    *count += ids.len();
                }
            }
        }
        self.observed
            .answered(&self.prompt_tokens, &completion_tokens);
        let predictions = preds
            .into_iter()
            .map(|mut per_fn| match &names {
                None => PredictionEntry::Single(per_fn.remove(0)),
                Some(names) => {
                    PredictionEntry::PerFunction(names.iter().cloned().zip(per_fn).collect())
                }
            })
            .collect();
        PredictResponse {
            predictions,
            tags: self.versions,
            usage: Usage {
                prompt_tokens: self.prompt_tokens.iter().sum(),
                completion_tokens: completion_tokens.iter().sum(),
            },
        }
    }
}

/// A request's place in the per-tag metrics: its labels (one per function, in order) and
/// when it arrived. Each request is counted once, answered or failed.
#[derive(Clone)]
struct Observed {
    metrics: Arc<TagMetrics>,
    labels: Vec<String>,
    started: Instant,
}

impl Observed {
    fn answered(&self, prompt_tokens: &[usize], completion_tokens: &[usize]) {
        let secs = self.started.elapsed().as_secs_f64();
        for (i, label) in self.labels.iter().enumerate() {
            let m = &self.metrics;
            m.requests.with_label_values(&[label, "ok"]).inc();
            m.latency.with_label_values(&[label]).observe(secs);
            let count = |kind: &str, n: Option<&usize>| {
                m.tokens
                    .with_label_values(&[label, kind])
                    .inc_by(n.copied().unwrap_or(0) as u64)
            };
            count("prompt", prompt_tokens.get(i));
            count("completion", completion_tokens.get(i));
        }
    }

    fn failed(&self, e: &PredictError) {
        let outcome = match e {
            PredictError::Validation(_) => "invalid",
            PredictError::Overloaded(_) => "refused",
            PredictError::Backend(_) | PredictError::Expired(_) => "failed",
        };
        for label in &self.labels {
            self.metrics
                .requests
                .with_label_values(&[label, outcome])
                .inc();
        }
    }

    /// Counts `result`'s failure, if it is one, and passes it on.
    fn check<T>(&self, result: Result<T, PredictError>) -> Result<T, PredictError> {
        if let Err(e) = &result {
            self.failed(e);
        }
        result
    }
}

/// A generation being streamed: its text pieces as they are decoded, then its answer.
/// Dropping it (the client left) abandons the generation.
pub struct Streaming {
    pub pieces: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub answer: PendingAnswer,
}

pub struct PendingAnswer {
    submitted: engine::Submitted,
    answer: Answer,
}

impl PendingAnswer {
    pub async fn wait(self) -> Result<(PredictResponse, Timings), PredictError> {
        let observed = self.answer.observed.clone();
        let (preds, timings) = observed.check(self.submitted.wait().await.map_err(Into::into))?;
        Ok((self.answer.respond(preds), timings))
    }
}

impl Predictor {
    /// Loads the base model once, opens (and optionally watches) the tag registry and
    /// starts the inference thread.
    pub fn load(
        model_path: &std::path::Path,
        device: &candle_core::Device,
        tags_dir: &std::path::Path,
        watch: bool,
        limits: Limits,
        engine_config: EngineConfig,
        metrics: &prometheus::Registry,
    ) -> anyhow::Result<Self> {
        let model = Arc::new(BaseModel::load(model_path, device)?);
        let identity = crate::tags::BaseModelIdentity::of(&model);
        let registry = Registry::open(tags_dir, identity, device.clone())?;
        let watcher = if watch { Some(registry.watch()?) } else { None };
        let engine_config = EngineConfig {
            precision: engine_config.precision.on(device),
            ..engine_config
        };
        let engine = Engine::start(
            model.at_precision(engine_config.precision)?,
            engine_config.clone(),
            Arc::new(EngineMetrics::new(metrics)?),
        )?;
        let tag_metrics = Arc::new(TagMetrics::new(metrics)?);
        // A token's string is its bytes as the tokenizer spells them: a byte-level BPE
        // char (`Ġ`) or SentencePiece's `▁` takes at least the one byte it stands for.
        let max_token_bytes = (0..model.tokenizer.vocab_size() as u32)
            .filter_map(|id| model.tokenizer.id_to_token(id))
            .map(|t| t.len())
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(Self {
            model,
            registry,
            engine,
            engine_config,
            limits,
            max_token_bytes,
            tag_metrics,
            _watcher: watcher,
        })
    }

    fn generation_params(&self, p: &Parameters) -> Result<GenerationParams, PredictError> {
        let max_new_tokens = p.max_new_tokens.unwrap_or(32);
        if max_new_tokens == 0 || max_new_tokens > self.limits.max_new_tokens {
            return Err(invalid(format!(
                "parameters.max_new_tokens must be in 1..={}",
                self.limits.max_new_tokens
            )));
        }
        if let Some(t) = p.temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(invalid(
                    "parameters.temperature must be a finite number >= 0",
                ));
            }
        }
        if let Some(tp) = p.top_p {
            if !(tp > 0.0 && tp <= 1.0) {
                return Err(invalid("parameters.top_p must be in (0, 1]"));
            }
        }
        if p.stop.iter().any(String::is_empty) {
            return Err(invalid("parameters.stop must not contain empty strings"));
        }
        Ok(GenerationParams {
            max_new_tokens,
            temperature: p.temperature,
            top_p: p.top_p,
            seed: p.seed.unwrap_or(0),
            stop: p.stop.clone(),
        })
    }

    /// Validates and composes the request, then runs it through the engine. Validation
    /// and composition (template parsing, tokenising up to `max_batch_inputs` inputs) are
    /// CPU work: they run on the blocking pool, never on the async threads.
    pub async fn predict(
        self: &Arc<Self>,
        req: Request,
    ) -> Result<(PredictResponse, Timings), PredictError> {
        let observed = self.observe(&req);
        let reservation = observed.check(self.reserve(&req))?;
        let p = observed.check(self.prepare_off_thread(req, observed.clone()).await)?;
        let result = self.engine.predict(p.groups, p.params, reservation).await;
        let (preds, timings) = observed.check(result.map_err(Into::into))?;
        Ok((p.answer.respond(preds), timings))
    }

    /// Like `predict`, for a request with `stream: true`: validated and admitted (or
    /// refused) before the first piece of text.
    pub async fn predict_streaming(
        self: &Arc<Self>,
        req: Request,
    ) -> Result<Streaming, PredictError> {
        let observed = self.observe(&req);
        let reservation = observed.check(self.reserve(&req))?;
        let p = observed.check(self.prepare_off_thread(req, observed.clone()).await)?;
        let (tx, pieces) = tokio::sync::mpsc::unbounded_channel();
        let submitted = self
            .engine
            .submit(p.groups, p.params, Some(tx), reservation);
        let submitted = observed.check(submitted.map_err(Into::into))?;
        Ok(Streaming {
            pieces,
            answer: PendingAnswer {
                submitted,
                answer: p.answer,
            },
        })
    }

    /// Admits the request on an estimate of its work (`admission`), held while it is
    /// prepared, or refuses it at once (429): under overload, turning a request away must
    /// cost less than preparing it. Its inputs are counted first: too many is the client's
    /// to fix (422), not an overload.
    fn reserve(&self, req: &Request) -> Result<admission::Ticket, PredictError> {
        if req.inputs.is_empty() {
            return Err(invalid("inputs must not be empty"));
        }
        if req.inputs.len() > self.limits.max_batch_inputs {
            return Err(invalid(format!(
                "at most {} inputs per request",
                self.limits.max_batch_inputs
            )));
        }
        let names = req.function_names();
        let sequences = req.inputs.len().saturating_mul(names.len().max(1)) as u64;
        // Its kind, whose requests are alike in size: its functions, or a raw template.
        let kind = names.join(",");
        self.engine
            .admission
            .reserve(&kind, sequences)
            .map_err(|refused| {
                let before = ["before_preparation"];
                self.engine
                    .metrics
                    .refusals
                    .with_label_values(&before)
                    .inc();
                PredictError::Overloaded(refused)
            })
    }

    /// The request's labels in the per-tag metrics: each function it names if it is a
    /// served function tag, else [`metrics::UNKNOWN_TAG`]; [`metrics::NO_TAG`] for none.
    fn observe(&self, req: &Request) -> Observed {
        let names = req.function_names();
        let labels = if names.is_empty() {
            vec![metrics::NO_TAG.to_string()]
        } else {
            let tags = self.registry.snapshot();
            names
                .iter()
                .map(|n| match tags.get(n) {
                    Some(b) if b.manifest.kind == TagKind::Function => n.to_string(),
                    _ => metrics::UNKNOWN_TAG.to_string(),
                })
                .collect()
        };
        Observed {
            metrics: self.tag_metrics.clone(),
            labels,
            started: Instant::now(),
        }
    }

    async fn prepare_off_thread(
        self: &Arc<Self>,
        req: Request,
        observed: Observed,
    ) -> Result<Prepared, PredictError> {
        let this = self.clone();
        let (tx, prepared) = tokio::sync::oneshot::channel();
        // Tokenising and composing are compute: they run on the lowered compute pool
        // (`model::threads`), not at the priority of the threads that answer HTTP. There
        // they took cycles from the 429s of an overload, and spun waiting on candle's
        // lowered pool for their tensor ops.
        rayon::spawn(move || {
            let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                this.prepare(&req, observed)
            }));
            let _ = tx.send(prepared);
        });
        match prepared.await {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(_)) => Err(PredictError::Backend(
                "request preparation failed (a panic)".into(),
            )),
            Err(_) => Err(PredictError::Backend(
                "request preparation was dropped".into(),
            )),
        }
    }

    /// Checks the request and composes every input with every function's template.
    fn prepare(&self, req: &Request, observed: Observed) -> Result<Prepared, PredictError> {
        let params = self.generation_params(&req.parameters)?;
        let tags = self.registry.snapshot();
        // Positions past the model's context have no rotary embedding: a longer sequence
        // is the client's to shorten (422), never the model's to fail on (500).
        let context = self.model.config().max_position_embeddings;
        let max_prompt = self.limits.max_input_tokens.min(context);
        // (template, head tag) per function in the request.
        let no_domains = BTreeMap::new();
        let (plans, names): (Vec<Plan>, Option<Vec<String>>) = match &req.prompt {
            Prompt::Function { name, domains } => {
                (vec![function_plan(&tags, name, domains)?], None)
            }
            Prompt::Functions(fs) => {
                let plans = fs
                    .iter()
                    .map(|f| function_plan(&tags, f, &no_domains))
                    .collect::<Result<_, _>>()?;
                (plans, Some(fs.clone()))
            }
            Prompt::Template(t) => (vec![(t.clone(), None)], None),
        };
        // Normalisation may shrink text (NFKC of a ligature), hence the margin of 4.
        let max_input_bytes = 4 * max_prompt * self.max_token_bytes;
        for (i, input) in req.inputs.iter().enumerate() {
            let bytes = match input {
                Input::Text(t) => t.len(),
                Input::Slots(slots) => slots.values().map(String::len).sum(),
            };
            if bytes > max_input_bytes {
                return Err(invalid(format!(
                    "inputs[{i}]: {bytes} bytes of text cannot fit the {max_prompt} tokens \
                     a prompt may hold: shorten the input"
                )));
            }
        }
        let mut versions = BTreeMap::new();
        let mut groups = Vec::with_capacity(req.inputs.len());
        let mut prompt_tokens = vec![0; plans.len()];
        for (i, input) in req.inputs.iter().enumerate() {
            let mut seqs = Vec::with_capacity(plans.len());
            for ((tpl, head), tokens) in plans.iter().zip(&mut prompt_tokens) {
                let c = compose(&self.model, &tags, tpl, input, head.as_deref(), max_prompt)
                    .map_err(|e| match e {
                        ComposeError::UnknownTag(_) => invalid(e.to_string()),
                        _ => invalid(format!("inputs[{i}]: {e}")),
                    })?;
                // Prompts are within the context already: only a generation can outgrow it.
                if scheduler::sequence_tokens(&c, &params) > context {
                    return Err(invalid(format!(
                        "inputs[{i}]: its prompt of {} tokens plus max_new_tokens {} \
                         exceeds the model's context of {context} tokens: lower \
                         parameters.max_new_tokens or shorten the input",
                        c.len(),
                        params.max_new_tokens
                    )));
                }
                versions.extend(c.versions.clone());
                *tokens += c.len();
                seqs.push(c);
            }
            groups.push(Group { seqs });
        }
        let generation_tokens: usize = groups
            .iter()
            .flat_map(|g| &g.seqs)
            .filter(|c| c.head.is_none())
            .map(|c| scheduler::sequence_tokens(c, &params))
            .sum();
        if generation_tokens > self.limits.max_generation_tokens {
            return Err(invalid(format!(
                "the generations of this request would hold {generation_tokens} tokens \
                 (prompts + max_new_tokens); the limit is {}: send fewer or shorter inputs",
                self.limits.max_generation_tokens
            )));
        }
        let one_generation =
            matches!(&groups[..], [g] if matches!(&g.seqs[..], [c] if c.head.is_none()));
        if req.stream && !one_generation {
            return Err(invalid(
                "stream: true needs one input and a template or function that generates \
                 text (no head)",
            ));
        }
        Ok(Prepared {
            groups,
            params,
            answer: Answer {
                names,
                versions,
                prompt_tokens,
                observed,
            },
        })
    }
}

/// A function tag's template (its domain tags replaced as `domains` says) and the tag
/// whose head it reads.
fn function_plan(
    tags: &crate::tags::TagSet,
    name: &str,
    domains: &BTreeMap<String, String>,
) -> Result<Plan, PredictError> {
    let bundle = tags
        .get(name)
        .ok_or_else(|| invalid(format!("unknown tag <{name}>")))?;
    if bundle.manifest.kind != TagKind::Function {
        return Err(invalid(format!(
            "<{name}> is a domain tag, not a function tag"
        )));
    }
    let source = bundle.manifest.template.as_deref().ok_or_else(|| {
        invalid(format!(
            "<{name}> has no default template; send `template` instead"
        ))
    })?;
    let mut template = Template::parse(source);
    for (from, to) in domains {
        if from == name || !template.replace_tag(from, to) {
            return Err(invalid(format!(
                "<{name}>'s template `{source}` names no domain tag <{from}> to replace"
            )));
        }
        match tags.get(to) {
            Some(b) if b.manifest.kind == TagKind::Domain => {}
            Some(_) => return Err(invalid(format!("<{to}> is not a domain tag"))),
            None => return Err(invalid(format!("unknown tag <{to}>"))),
        }
    }
    Ok((template, Some(name.to_string())))
}
