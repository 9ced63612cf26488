//! OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions` and
//! `POST /v1/chat/completions`, so the `openai` package (and gateways that route on
//! `model`) reach the base model and every generation tag. Each choice is one request to
//! the predictor: the same admission, limits and metrics as `/predict`.

pub mod errors;
mod prompts;
mod stream;
pub mod wire;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::StringRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::routes::predict_error;
use super::sse::ServerSentEvent;
use super::state::AppState;
use crate::infer::{
    Input, Parameters, PredictResponse, Prediction, PredictionEntry, Prompt, Request,
};
use crate::model::FinishReason;
use errors::{checked_body, V1Error};
use prompts::{
    base_id, chat_messages, chat_prompt, generation_tags, resolve, target_prompt, Target,
};
use wire::*;

/// Choices per prompt at most (`n`).
pub const MAX_CHOICES: usize = 8;
/// Stop strings at most (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// Completions' `max_tokens` when none is sent (OpenAI's default).
const COMPLETION_MAX_TOKENS: usize = 16;

type Shared = State<Arc<AppState>>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The base model, and every tag that generates text (as vLLM lists its adapters).
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)))]
pub async fn list_models(State(s): Shared) -> Result<Json<ModelList>, V1Error> {
    let p = s.predictor()?;
    let base = base_id(p);
    let max_model_len = p.model.config().max_position_embeddings;
    let created = now();
    let entry = |id: String, parent: Option<String>| Model {
        id,
        object: "model".into(),
        created,
        owned_by: "tagllm".into(),
        root: base.clone(),
        parent,
        max_model_len,
    };
    let mut data = vec![entry(base.clone(), None)];
    data.extend(
        generation_tags(p)
            .into_iter()
            .map(|name| entry(name, Some(base.clone()))),
    );
    Ok(Json(ModelList {
        object: "list".into(),
        data,
    }))
}

/// `Sampling` as the predictor's parameters, and the number of choices.
fn parameters(
    s: &Sampling,
    max_tokens: usize,
    limit: usize,
) -> Result<(Parameters, usize), V1Error> {
    if !(1..=limit).contains(&max_tokens) {
        return Err(V1Error::invalid(
            "max_tokens",
            format!("max_tokens must be in 1..={limit} (the server's --max-new-tokens)"),
        ));
    }
    let n = s.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(V1Error::invalid(
            "n",
            format!("n must be in 1..={MAX_CHOICES}"),
        ));
    }
    let stop = s.stop.clone().map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > MAX_STOPS {
        return Err(V1Error::invalid(
            "stop",
            format!("at most {MAX_STOPS} stop strings"),
        ));
    }
    let params = Parameters {
        max_new_tokens: Some(max_tokens),
        temperature: Some(s.temperature.unwrap_or(1.0)),
        top_p: s.top_p,
        seed: s.seed,
        stop,
    };
    Ok((params, n))
}

/// One request per choice: every prompt `n` times, the i-th with seed `seed + i`.
fn choices(
    prompt: &Prompt,
    inputs: Vec<Input>,
    params: &Parameters,
    n: usize,
    stream: bool,
) -> Vec<Request> {
    let seed = params.seed.unwrap_or(0);
    inputs
        .into_iter()
        .flat_map(|input| (0..n as u64).map(move |i| (input.clone(), i)))
        .map(|(input, i)| Request {
            prompt: prompt.clone(),
            inputs: vec![input],
            parameters: Parameters {
                seed: Some(seed.wrapping_add(i)),
                ..params.clone()
            },
            stream,
        })
        .collect()
}

fn parse<T: DeserializeOwned>(
    body: Result<String, StringRejection>,
    known: &[&str],
) -> Result<T, V1Error> {
    let body = body.map_err(ApiError::from)?;
    let value = checked_body(body.as_bytes(), known)?;
    // The path names the field at fault (`messages[0].content`), and its head is `param`.
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = path
            .split(['.', '['])
            .next()
            .filter(|p| !p.is_empty() && *p != "?")
            .unwrap_or("body")
            .to_string();
        V1Error::invalid(&param, format!("{path}: {}", e.inner()))
    })
}

const SAMPLING_FIELDS: [&str; 9] = [
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "tags",
];

fn fields(own: &[&'static str]) -> Vec<&'static str> {
    own.iter().chain(SAMPLING_FIELDS.iter()).copied().collect()
}

/// A text completion of the base model, or of a generation tag's template filled with the
/// prompt.
#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, description = "The completion; with `stream: true`, server-sent events whose `data` is a `Completion` chunk (JSON text) each, then `[DONE]`",
        content((Completion = "application/json"), (ServerSentEvent = "text/event-stream"))),
        (status = 400, body = OpenAiErrorBody, description = "Invalid input; `param` names the field"),
        (status = 404, body = OpenAiErrorBody, description = "No such model"),
        (status = 429, body = OpenAiErrorBody, description = "Over capacity; `Retry-After` says when to come back")))]
pub async fn completions(State(s): Shared, body: Result<String, StringRejection>) -> Response {
    let req: CompletionRequest = match parse(body, &fields(&["model", "prompt"])) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let plan = completion_plan(&s, &req);
    answer(s, plan, false, &req.model, &req.sampling).await
}

fn completion_plan(s: &AppState, req: &CompletionRequest) -> Result<Plan, V1Error> {
    let p = s.predictor()?;
    let prompts = req.prompt.clone().into_vec();
    if prompts.is_empty() || prompts.len() > p.limits.max_batch_inputs {
        return Err(V1Error::invalid(
            "prompt",
            format!("1 to {} prompts per request", p.limits.max_batch_inputs),
        ));
    }
    let target = resolve(p, &req.model)?;
    let max_tokens = req.sampling.max_tokens.unwrap_or(COMPLETION_MAX_TOKENS);
    let (params, n) = parameters(&req.sampling, max_tokens, p.limits.max_new_tokens)?;
    let prompt = target_prompt(p, &target, &req.sampling)?;
    let inputs = prompts.into_iter().map(Input::Text).collect();
    Ok(Plan {
        requests: choices(&prompt, inputs, &params, n, req.sampling.stream),
        n,
    })
}

/// A chat answer: the base model with its chat template, or a generation tag whose
/// template the last user message fills.
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatRequest,
    responses((status = 200, description = "The answer; with `stream: true`, server-sent events whose `data` is a `ChatCompletionChunk` (JSON text) each, then `[DONE]`",
        content((ChatCompletion = "application/json"), (ServerSentEvent = "text/event-stream"))),
        (status = 400, body = OpenAiErrorBody, description = "Invalid input; `param` names the field"),
        (status = 404, body = OpenAiErrorBody, description = "No such model"),
        (status = 429, body = OpenAiErrorBody, description = "Over capacity; `Retry-After` says when to come back")))]
pub async fn chat_completions(State(s): Shared, body: Result<String, StringRejection>) -> Response {
    let req: ChatRequest = match parse(
        body,
        &fields(&["model", "messages", "max_completion_tokens"]),
    ) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let plan = chat_plan(&s, &req);
    answer(s, plan, true, &req.model, &req.sampling).await
}

fn chat_plan(s: &AppState, req: &ChatRequest) -> Result<Plan, V1Error> {
    let p = s.predictor()?;
    let messages = chat_messages(&req.messages)?;
    let target = resolve(p, &req.model)?;
    let context = p.model.config().max_position_embeddings;
    let max_tokens = req
        .max_completion_tokens
        .or(req.sampling.max_tokens)
        .unwrap_or_else(|| p.limits.max_new_tokens.min(context / 2).max(1));
    let (params, n) = parameters(&req.sampling, max_tokens, p.limits.max_new_tokens)?;
    let (prompt, input) = match &target {
        Target::Base => {
            let borrowed: Vec<(&str, &str)> =
                messages.iter().map(|(r, c)| (*r, c.as_str())).collect();
            let pieces = p
                .model
                .tokenizer
                .chat_pieces(&borrowed)
                .map_err(|e| V1Error::invalid("messages", format!("{e:#}")))?;
            chat_prompt(pieces, &messages)
        }
        Target::Tag(_) => {
            let last_user = messages
                .iter()
                .rev()
                .find(|(role, _)| *role == "user")
                .ok_or_else(|| V1Error::invalid("messages", "a tag's chat needs a user message"))?;
            let prompt = target_prompt(p, &target, &req.sampling)?;
            (prompt, Input::Text(last_user.1.clone()))
        }
    };
    Ok(Plan {
        requests: choices(&prompt, vec![input], &params, n, req.sampling.stream),
        n,
    })
}

/// The plan's answer, or its error.
async fn answer(
    s: Arc<AppState>,
    plan: Result<Plan, V1Error>,
    chat: bool,
    model: &str,
    sampling: &Sampling,
) -> Response {
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => return e.into_response(),
    };
    let prefix = if chat { "chatcmpl" } else { "cmpl" };
    let format = Format {
        chat,
        id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
        created: now(),
        model: model.to_string(),
        fingerprint: fingerprint(&s),
    };
    serve(s, plan, format, sampling).await
}

fn fingerprint(s: &AppState) -> String {
    let f = s
        .predictor
        .get()
        .map_or("", |p| p.model.fingerprint.as_str());
    format!("fp_{}", &f[..f.len().min(12)])
}

/// The requests of one call, `n` per prompt.
struct Plan {
    requests: Vec<Request>,
    n: usize,
}

/// How answers are written: completions or chat, and what every chunk repeats.
pub(super) struct Format {
    chat: bool,
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
}

impl Format {
    /// A completion (the whole answer, or one chunk of a stream) of `choices`.
    fn completion(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<CompletionUsage>,
    ) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.fingerprint.clone(),
            choices,
            usage,
        }
    }
}

pub(super) fn finish(reason: FinishReason) -> String {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    }
    .into()
}

/// The generated text of a one-input response.
pub(super) fn generated(resp: &PredictResponse) -> Option<(&str, FinishReason)> {
    match resp.predictions.first() {
        Some(PredictionEntry::Single(Prediction::Text {
            text,
            finish_reason,
            ..
        })) => Some((text, *finish_reason)),
        _ => None,
    }
}

/// Usage over the choices, in order: each prompt counted once (its first choice), every
/// generated token.
pub(super) fn usage<'a>(
    resps: impl IntoIterator<Item = &'a PredictResponse>,
    n: usize,
) -> CompletionUsage {
    let mut u = CompletionUsage::default();
    for (i, r) in resps.into_iter().enumerate() {
        if i % n == 0 {
            u.prompt_tokens += r.usage.prompt_tokens;
        }
        u.completion_tokens += r.usage.completion_tokens;
    }
    u.total_tokens = u.prompt_tokens + u.completion_tokens;
    u
}

async fn serve(s: Arc<AppState>, plan: Plan, format: Format, sampling: &Sampling) -> Response {
    let Ok(p) = s.predictor().cloned() else {
        return V1Error::from(ApiError::not_ready()).into_response();
    };
    let Ok(permit) = s.permits.clone().try_acquire_owned() else {
        return V1Error::from(ApiError::overloaded()).into_response();
    };
    if sampling.stream {
        let include_usage = sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        let mut streams = Vec::with_capacity(plan.requests.len());
        for req in plan.requests {
            match p.predict_streaming(req).await {
                Ok(st) => streams.push(st),
                Err(e) => return predict_error(e),
            }
        }
        let stop = s.shutdown.subscribe();
        return stream::stream(streams, plan.n, format, include_usage, permit, stop)
            .into_response();
    }
    let answers =
        futures_util::future::try_join_all(plan.requests.into_iter().map(|r| p.predict(r))).await;
    drop(permit);
    let answers: Vec<PredictResponse> = match answers {
        Ok(a) => a.into_iter().map(|(r, _)| r).collect(),
        Err(e) => return predict_error(e),
    };
    let mut texts = Vec::with_capacity(answers.len());
    for a in &answers {
        match generated(a) {
            Some(t) => texts.push(t),
            None => {
                return V1Error::from(ApiError::backend("a generation answered no text"))
                    .into_response()
            }
        }
    }
    let usage = usage(&answers, plan.n);
    if format.chat {
        Json(ChatCompletion {
            id: format.id,
            object: "chat.completion".into(),
            created: format.created,
            model: format.model,
            system_fingerprint: format.fingerprint,
            choices: texts
                .into_iter()
                .enumerate()
                .map(|(index, (text, reason))| ChatChoice {
                    index,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: text.to_string(),
                    },
                    logprobs: None,
                    finish_reason: finish(reason),
                })
                .collect(),
            usage,
        })
        .into_response()
    } else {
        let choices = texts
            .into_iter()
            .enumerate()
            .map(|(index, (text, reason))| CompletionChoice {
                index,
                text: text.to_string(),
                logprobs: None,
                finish_reason: Some(finish(reason)),
            })
            .collect();
        Json(format.completion(choices, Some(usage))).into_response()
    }
}
