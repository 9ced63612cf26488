//! The prediction side: the batching engine, heads, and the `predict` entry point the
//! HTTP layer calls.

pub mod admission;
pub mod engine;
mod executor;
pub mod heads;
pub mod metrics;
mod prepare;
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
use crate::tags::{Registry, TagKind};
use metrics::Observed;

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
    /// The predictor over a loaded base model and its tag registry (optionally watched for
    /// changes): starts the inference thread.
    pub fn new(
        model: Arc<BaseModel>,
        registry: Arc<Registry>,
        watch: bool,
        limits: Limits,
        engine_config: EngineConfig,
        metrics: &prometheus::Registry,
    ) -> anyhow::Result<Self> {
        let device = model.device().clone();
        let watcher = if watch { Some(registry.watch()?) } else { None };
        let engine_config = EngineConfig {
            precision: engine_config.precision.on(&device),
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
}
