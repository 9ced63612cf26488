//! The prediction side: the batching engine, heads, and the `predict` entry point the
//! HTTP layer calls.

pub mod admission;
pub mod engine;
mod executor;
pub mod heads;
pub mod scheduler;

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::tags::compose::{compose, ComposeError, Composed, Input};
pub use engine::{Engine, EngineConfig, EngineError, Group, Timings};
pub use heads::Prediction;

use crate::model::{BaseModel, GenerationParams};
use crate::tags::{Registry, TagKind, Template};

/// Engine gauges and histograms, registered in the server's Prometheus registry.
pub struct EngineMetrics {
    pub queue_depth: IntGauge,
    pub batch_size: Histogram,
    pub restarts: IntCounter,
    /// Generations decoding, and the bytes their slot cache holds.
    pub decoding: IntGauge,
    pub decode_cache_bytes: IntGauge,
    /// 429s of admission by `stage`: `before_preparation` (on the request's estimate) or
    /// `after_preparation` (it outgrew its estimate). Under overload nearly all should be
    /// the first: a refusal after preparation cost the compute of tokenising.
    pub refusals: IntCounterVec,
}

impl EngineMetrics {
    pub fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let queue_depth = IntGauge::new(
            "tagllm_queue_depth",
            "Requests waiting for the inference thread",
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("tagllm_batch_size", "Sequences per engine batch")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
        )?;
        let restarts = IntCounter::new(
            "tagllm_engine_restarts_total",
            "Times the inference engine failed and was restarted",
        )?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        let decoding = IntGauge::new("tagllm_generations_decoding", "Generations decoding")?;
        let decode_cache_bytes = IntGauge::new(
            "tagllm_decode_cache_bytes",
            "Bytes of keys/values held for the generations decoding",
        )?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(decoding.clone()))?;
        registry.register(Box::new(decode_cache_bytes.clone()))?;
        let refusals = IntCounterVec::new(
            Opts::new(
                "tagllm_admission_refusals_total",
                "Requests refused by admission (429), before or after their preparation",
            ),
            &["stage"],
        )?;
        registry.register(Box::new(refusals.clone()))?;
        Ok(Self {
            queue_depth,
            batch_size,
            restarts,
            decoding,
            decode_cache_bytes,
            refusals,
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Parameters {
    /// Tokens to generate at most (no-head predictions). Default 32.
    pub max_new_tokens: Option<usize>,
    /// 0 (default) decodes greedily.
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold in (0, 1].
    pub top_p: Option<f64>,
    /// Seed for sampling.
    pub seed: Option<u64>,
    /// Generation stops when the text contains one of these (cut from the text).
    #[serde(default)]
    pub stop: Vec<String>,
}

/// A prediction request: exactly one of `function`, `functions` or `template` (none, or
/// two, is a 422 `validation` error).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"template": "{x}", "inputs": ["the cat"],
    "parameters": {"max_new_tokens": 4}}))]
pub struct PredictRequest {
    /// A function tag: its manifest's template, slots and head.
    pub function: Option<String>,
    /// Several function tags over the same inputs; their common prefix is computed once.
    #[schema(value_type = Option<std::collections::BTreeSet<String>>, min_items = 1)]
    pub functions: Option<Vec<String>>,
    /// Any composition of registered tags, `<Tag>`, with input slots `{slot}`.
    pub template: Option<String>,
    /// One per example: an object of slot values, or a bare string for one slot.
    #[schema(min_items = 1)]
    pub inputs: Vec<Input>,
    #[serde(default, deserialize_with = "crate::json_object::object")]
    pub parameters: Parameters,
    /// Stream the generated text as server-sent events (`text/event-stream`): `token`
    /// events carry pieces of text as they are decoded, then one `done` event carries the
    /// whole answer (as without streaming), or an `error` event. Needs one input and a
    /// template or function that generates text.
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PredictionEntry {
    Single(Prediction),
    /// With `functions`: one prediction per function tag.
    PerFunction(BTreeMap<String, Prediction>),
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PredictResponse {
    pub predictions: Vec<PredictionEntry>,
    /// Versions of every tag used.
    pub tags: BTreeMap<String, u64>,
}

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
}

impl Answer {
    fn respond(self, preds: Vec<Vec<Prediction>>) -> PredictResponse {
        let names = self.names;
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
        }
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
        let (preds, timings) = self.submitted.wait().await?;
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
        req: PredictRequest,
    ) -> Result<(PredictResponse, Timings), PredictError> {
        let reservation = self.reserve(&req)?;
        let p = self.prepare_off_thread(req).await?;
        let (preds, timings) = self.engine.predict(p.groups, p.params, reservation).await?;
        Ok((p.answer.respond(preds), timings))
    }

    /// Like `predict`, for a request with `stream: true`: validated and admitted (or
    /// refused) before the first piece of text.
    pub async fn predict_streaming(
        self: &Arc<Self>,
        req: PredictRequest,
    ) -> Result<Streaming, PredictError> {
        let reservation = self.reserve(&req)?;
        let p = self.prepare_off_thread(req).await?;
        let (tx, pieces) = tokio::sync::mpsc::unbounded_channel();
        let submitted = self
            .engine
            .submit(p.groups, p.params, Some(tx), reservation)?;
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
    fn reserve(&self, req: &PredictRequest) -> Result<admission::Ticket, PredictError> {
        if req.inputs.is_empty() {
            return Err(invalid("inputs must not be empty"));
        }
        if req.inputs.len() > self.limits.max_batch_inputs {
            return Err(invalid(format!(
                "at most {} inputs per request",
                self.limits.max_batch_inputs
            )));
        }
        let functions = req.functions.as_ref().map_or(1, |f| f.len().max(1));
        let sequences = req.inputs.len().saturating_mul(functions) as u64;
        // Its kind, whose requests are alike in size: its functions, or a raw template.
        let kind = match (&req.function, &req.functions) {
            (Some(f), _) => f.clone(),
            (None, Some(fs)) => fs.join(","),
            (None, None) => String::new(),
        };
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

    async fn prepare_off_thread(
        self: &Arc<Self>,
        req: PredictRequest,
    ) -> Result<Prepared, PredictError> {
        let this = self.clone();
        let (tx, prepared) = tokio::sync::oneshot::channel();
        // Tokenising and composing are compute: they run on the lowered compute pool
        // (`model::threads`), not at the priority of the threads that answer HTTP. There
        // they took cycles from the 429s of an overload, and spun waiting on candle's
        // lowered pool for their tensor ops.
        rayon::spawn(move || {
            let prepared =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| this.prepare(&req)));
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
    fn prepare(&self, req: &PredictRequest) -> Result<Prepared, PredictError> {
        let params = self.generation_params(&req.parameters)?;
        if let Some(t) = &req.template {
            crate::tags::template::check_size(t).map_err(invalid)?;
        }
        let tags = self.registry.snapshot();
        // Positions past the model's context have no rotary embedding: a longer sequence
        // is the client's to shorten (422), never the model's to fail on (500).
        let context = self.model.config().max_position_embeddings;
        let max_prompt = self.limits.max_input_tokens.min(context);
        // (template, head tag) per function in the request.
        let (plans, names): (Vec<Plan>, Option<Vec<String>>) =
            match (&req.function, &req.functions, &req.template) {
                (Some(f), None, None) => (vec![self.function_plan(&tags, f)?], None),
                (None, Some(fs), None) => {
                    if fs.is_empty() {
                        return Err(invalid("functions must not be empty"));
                    }
                    // Results are keyed by name: a repeat would silently fold into one.
                    if let Some(dup) = fs.iter().enumerate().find(|(i, f)| fs[..*i].contains(f)) {
                        return Err(invalid(format!("functions names `{}` twice", dup.1)));
                    }
                    let plans = fs
                        .iter()
                        .map(|f| self.function_plan(&tags, f))
                        .collect::<Result<_, _>>()?;
                    (plans, Some(fs.clone()))
                }
                (None, None, Some(t)) => (vec![(Template::parse(t), None)], None),
                _ => {
                    return Err(invalid(
                        "give exactly one of `function`, `functions` or `template`",
                    ))
                }
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
        for (i, input) in req.inputs.iter().enumerate() {
            let mut seqs = Vec::with_capacity(plans.len());
            for (tpl, head) in &plans {
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
            answer: Answer { names, versions },
        })
    }

    fn function_plan(&self, tags: &crate::tags::TagSet, name: &str) -> Result<Plan, PredictError> {
        let bundle = tags
            .get(name)
            .ok_or_else(|| invalid(format!("unknown tag <{name}>")))?;
        if bundle.manifest.kind != TagKind::Function {
            return Err(invalid(format!(
                "<{name}> is a domain tag, not a function tag"
            )));
        }
        let template = bundle.manifest.template.as_deref().ok_or_else(|| {
            invalid(format!(
                "<{name}> has no default template; send `template` instead"
            ))
        })?;
        Ok((Template::parse(template), Some(name.to_string())))
    }
}
