//! Handlers. No tensor work here: everything goes through `infer` and `tags`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, ErrorKind};
use super::sse::ServerSentEvent;
use super::state::AppState;
use crate::infer::{PredictError, PredictRequest, PredictResponse};
use crate::json_object::Object;
use crate::tags::{ReloadReport, TagManifest};

type Shared = State<Arc<AppState>>;

#[derive(Serialize, ToSchema)]
pub struct Status {
    pub status: String,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Status)))]
pub async fn health() -> Json<Status> {
    Json(Status {
        status: "ok".into(),
    })
}

/// Readiness: the model is loaded and predictions can be served.
#[utoipa::path(get, path = "/ready", responses((status = 200, body = Status), (status = 503, body = ErrorBody)))]
pub async fn ready(State(s): Shared) -> Result<Json<Status>, ApiError> {
    if !s.predictor()?.engine.is_alive() {
        return Err(ApiError::new(
            ErrorKind::EngineDown,
            "the inference engine is down (restarting after a fault)",
        ));
    }
    Ok(Json(Status {
        status: "ready".into(),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct InfoResponse {
    pub version: String,
    pub model: ModelInfo,
    pub limits: LimitsInfo,
}

#[derive(Serialize, ToSchema)]
pub struct ModelInfo {
    pub name: String,
    pub format: String,
    pub fingerprint: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    pub parameters: usize,
}

#[derive(Serialize, ToSchema)]
pub struct LimitsInfo {
    pub max_input_tokens: usize,
    pub max_batch_inputs: usize,
    pub max_new_tokens: usize,
    pub max_generation_tokens: usize,
    pub max_batch_tokens: usize,
    pub max_concurrent_requests: usize,
    pub max_body_bytes: usize,
    /// Admission: the longest estimated wait before a new head request (regression,
    /// classification) is answered (else 429).
    pub max_queue_wait_ms: u64,
    /// Admission: the longest estimated wait for a new generation's first token (else 429).
    pub max_first_token_wait_ms: u64,
    /// Generations decoded together at most (the decoding batch's slots).
    pub max_generations: usize,
    /// The engine's measured prefill pace at the margin: prompt tokens per second that one
    /// more token in a forward costs. Waits are estimated from it.
    pub pace_units_per_second: f64,
    /// The measured time every prefill forward takes whatever its size (reading the
    /// weights), in ms.
    pub prefill_fixed_ms: f64,
    /// The measured (or interpolated) time of one decoding step of 1, 16 and 64
    /// generations, in ms: a step of 16 is not 16 steps of 1.
    pub decode_step_ms: BTreeMap<String, f64>,
    /// How serving reads the frozen matrices: `f32` or `q8_0`.
    pub precision: String,
}

/// The model, limits and version.
#[utoipa::path(get, path = "/info", responses((status = 200, body = InfoResponse), (status = 503, body = ErrorBody)))]
pub async fn info(State(s): Shared) -> Result<Json<InfoResponse>, ApiError> {
    let p = s.predictor()?;
    let c = p.model.config();
    Ok(Json(InfoResponse {
        version: env!("CARGO_PKG_VERSION").into(),
        model: ModelInfo {
            name: p.model.name.clone(),
            format: p.model.format.into(),
            fingerprint: p.model.fingerprint.clone(),
            hidden_size: c.hidden_size,
            num_layers: c.num_layers,
            vocab_size: c.vocab_size,
            parameters: c.parameter_count(),
        },
        limits: LimitsInfo {
            max_input_tokens: p.limits.max_input_tokens,
            max_batch_inputs: p.limits.max_batch_inputs,
            max_new_tokens: p.limits.max_new_tokens,
            max_generation_tokens: p.limits.max_generation_tokens,
            max_batch_tokens: p.engine_config.max_batch_tokens,
            max_concurrent_requests: s.config.max_concurrent_requests,
            max_body_bytes: s.config.max_body_bytes,
            max_queue_wait_ms: p.engine_config.max_queue_wait.as_millis() as u64,
            max_first_token_wait_ms: p.engine_config.max_first_token_wait.as_millis() as u64,
            max_generations: p.engine_config.max_generations,
            pace_units_per_second: p.engine.admission.pace(),
            prefill_fixed_ms: p.engine.admission.prefill_fixed_seconds() * 1e3,
            decode_step_ms: [1usize, 16, 64]
                .into_iter()
                .map(|n| (n.to_string(), p.engine.admission.step_seconds(n) * 1e3))
                .collect(),
            precision: p.engine_config.precision.name().into(),
        },
    }))
}

#[derive(Serialize, ToSchema)]
pub struct TagSummary {
    pub name: String,
    #[schema(value_type = String)]
    pub kind: crate::tags::TagKind,
    pub version: u64,
    pub num_vectors: usize,
    /// regression, classification, or null (generation).
    pub head: Option<String>,
    pub template: Option<String>,
    /// `bundle` or `peft`.
    pub source: String,
}

#[derive(Serialize, ToSchema)]
pub struct TagList {
    pub tags: Vec<TagSummary>,
    /// Bundle directories that failed validation, with the reason. A tag listed here and
    /// in `tags` is still served in its last good version.
    pub errors: BTreeMap<String, String>,
}

/// Every served tag, and every bundle that failed validation.
#[utoipa::path(get, path = "/tags", responses((status = 200, body = TagList), (status = 503, body = ErrorBody)))]
pub async fn list_tags(State(s): Shared) -> Result<Json<TagList>, ApiError> {
    let set = s.predictor()?.registry.snapshot();
    let tags = set
        .tags
        .values()
        .map(|b| TagSummary {
            name: b.name().to_string(),
            kind: b.manifest.kind,
            version: b.version(),
            num_vectors: b.num_vectors(),
            head: b.manifest.head.as_ref().map(|h| h.kind_name().to_string()),
            template: b.manifest.template.clone(),
            source: b.source.to_string(),
        })
        .collect();
    Ok(Json(TagList {
        tags,
        errors: set.errors.clone(),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct TagDetail {
    #[schema(value_type = Object)]
    pub manifest: TagManifest,
    pub source: String,
    /// Why the bundle on disk is not served, if its last reload failed.
    pub error: Option<String>,
}

/// One tag's full manifest.
#[utoipa::path(get, path = "/tags/{name}", params(("name" = String, Path, description = "tag name")),
    responses((status = 200, body = TagDetail), (status = 404, description = "No such tag", body = ErrorBody)))]
pub async fn get_tag(
    State(s): Shared,
    Path(name): Path<String>,
) -> Result<Json<TagDetail>, ApiError> {
    let set = s.predictor()?.registry.snapshot();
    let b = set
        .get(&name)
        .ok_or_else(|| ApiError::not_found(format!("no tag <{name}>")))?;
    Ok(Json(TagDetail {
        manifest: b.manifest.clone(),
        source: b.source.to_string(),
        error: set.errors.get(&name).cloned(),
    }))
}

/// Rescans the tags directory now (the file watcher does this by itself within a second).
#[utoipa::path(post, path = "/tags/reload", responses((status = 200, body = ReloadReport)), security(("admin" = [])))]
pub async fn reload_tags(State(s): Shared) -> Result<Json<ReloadReport>, ApiError> {
    let registry = s.predictor()?.registry.clone();
    let report = tokio::task::spawn_blocking(move || registry.rescan())
        .await
        .map_err(|e| ApiError::backend(e.to_string()))?;
    Ok(Json(report))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub text: String,
}

#[derive(Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
}

/// Token ids of a text (special-token strings become their ids; no tags are parsed).
#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), (status = 422, description = "Invalid input; the error names the problem", body = ErrorBody)))]
pub async fn tokenize(
    State(s): Shared,
    body: Result<Json<Object<TokenizeRequest>>, JsonRejection>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let Json(Object(req)) = body?;
    let p = s.predictor()?.clone();
    // Up to a body's worth of text: tokenised on the blocking pool.
    let (ids, tokens) = tokio::task::spawn_blocking(move || {
        let ids = p
            .model
            .tokenizer
            .encode(&req.text)
            .map_err(|e| ApiError::validation(format!("{e:#}")))?;
        let tokens = ids
            .iter()
            .map(|&i| p.model.tokenizer.id_to_token(i).unwrap_or_default())
            .collect();
        Ok::<_, ApiError>((ids, tokens))
    })
    .await
    .map_err(|e| ApiError::backend(e.to_string()))??;
    Ok(Json(TokenizeResponse { ids, tokens }))
}

/// Predictions for a batch of inputs under a function tag, several function tags, or a
/// free template composing any registered tags.
#[utoipa::path(post, path = "/predict", request_body = PredictRequest,
    responses((status = 200, description = "The predictions; with `stream: true`, server-sent events: `token` events ({\"text\": piece}) as the text is decoded, then `done` (the response as without streaming) or `error` (an error body)",
                content((PredictResponse = "application/json"), (ServerSentEvent = "text/event-stream")),
                headers(("x-queue-time" = String, description = "ms waiting for the engine (not streamed)"),
                        ("x-inference-time" = String, description = "ms in the engine batch (not streamed)"))),
              (status = 422, description = "Invalid input; the error names the problem", body = ErrorBody), (status = 413, description = "The body is larger than the configured limit", body = ErrorBody),
              (status = 429, body = ErrorBody, description = "Over capacity: too many requests in flight, or more queued work than the queue's wait budget",
                headers(("retry-after" = String, description = "seconds, the queue's estimated wait (work admission only)"))),
              (status = 503, body = ErrorBody, description = "Not ready, or queued past its deadline")))]
pub async fn predict(
    State(s): Shared,
    body: Result<Json<Object<PredictRequest>>, JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Json(Object(req)) = body?;
    let p = s.predictor()?.clone();
    let permit = s
        .permits
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::overloaded())?;
    let req = match crate::infer::Request::try_from(req) {
        Ok(req) => req,
        Err(e) => return Ok(predict_error(e)),
    };
    if req.stream {
        return match p.predict_streaming(req).await {
            Ok(streaming) => {
                Ok(stream_events(streaming, permit, s.shutdown.subscribe()).into_response())
            }
            Err(e) => Ok(predict_error(e)),
        };
    }
    let (resp, timings) = match p.predict(req).await {
        Ok(r) => r,
        Err(e) => return Ok(predict_error(e)),
    };
    drop(permit);
    let mut headers = HeaderMap::new();
    let ms =
        |d: std::time::Duration| HeaderValue::try_from(format!("{:.3}", d.as_secs_f64() * 1e3));
    if let (Ok(queue), Ok(inference)) = (ms(timings.queue), ms(timings.inference)) {
        headers.insert("x-queue-time", queue);
        headers.insert("x-inference-time", inference);
    }
    headers.insert("x-batch-size", HeaderValue::from(timings.batch_size));
    Ok((StatusCode::OK, headers, Json::<PredictResponse>(resp)).into_response())
}

pub(super) fn predict_api_error(e: PredictError) -> ApiError {
    match e {
        PredictError::Overloaded(refused) => {
            ApiError::new(ErrorKind::Overloaded, refused.to_string())
        }
        PredictError::Expired(m) => ApiError::new(ErrorKind::QueueTimeout, m),
        PredictError::Validation(m) => ApiError::validation(m),
        PredictError::Backend(m) => ApiError::backend(m),
    }
}

pub(super) fn predict_error(e: PredictError) -> axum::response::Response {
    // Retry-After: the queue's estimated wait, rounded up to whole seconds.
    let retry_after = match &e {
        PredictError::Overloaded(refused) => {
            Some(refused.estimated_wait.as_secs_f64().ceil().max(1.0) as u64)
        }
        _ => None,
    };
    let err = predict_api_error(e);
    match retry_after {
        Some(secs) => (
            [(axum::http::header::RETRY_AFTER, HeaderValue::from(secs))],
            err,
        )
            .into_response(),
        None => err.into_response(),
    }
}

/// The events of a streamed generation: a `token` per printable piece, then `done` with
/// the whole answer or `error`. The permit and the engine's work live as long as the
/// stream: a client that leaves ends the generation, and so does the server shutting
/// down (`stop`), after a last `error` event that says so.
fn stream_events(
    streaming: crate::infer::Streaming,
    permit: tokio::sync::OwnedSemaphorePermit,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    struct State {
        pieces: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
        answer: Option<crate::infer::PendingAnswer>,
        stop: tokio::sync::watch::Receiver<bool>,
        _permit: tokio::sync::OwnedSemaphorePermit,
    }
    let state = State {
        pieces: Some(streaming.pieces),
        answer: Some(streaming.answer),
        stop,
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let answer = st.answer.take()?;
        let mut stop = st.stop.clone();
        let next = async {
            if let Some(pieces) = st.pieces.as_mut() {
                if let Some(text) = pieces.recv().await {
                    let event = Event::default()
                        .event("token")
                        .json_data(serde_json::json!({ "text": text }));
                    return (event, Some(answer));
                }
                st.pieces = None;
            }
            let event = match answer.wait().await {
                Ok((resp, _)) => Event::default().event("done").json_data(&resp),
                Err(e) => Event::default()
                    .event("error")
                    .json_data(predict_api_error(e).into_body()),
            };
            (event, None)
        };
        let shutting_down = async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        };
        let (event, answer) = tokio::select! {
            next = next => next,
            // Dropping the answer ends the generation in the engine.
            () = shutting_down => {
                let e = ApiError::new(
                    ErrorKind::ShuttingDown,
                    "the server is shutting down; the generation was stopped",
                );
                (Event::default().event("error").json_data(e.into_body()), None)
            }
        };
        st.answer = answer;
        Some((Ok(event.unwrap_or_default()), st))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Prometheus metrics: requests, latency, queue depth, batch sizes, tags loaded.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String)))]
pub async fn metrics(State(s): Shared) -> impl IntoResponse {
    if let Some(p) = s.predictor.get() {
        s.metrics
            .tags_loaded
            .set(p.registry.snapshot().tags.len() as i64);
    }
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&s.metrics.registry.gather())
        .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
}
