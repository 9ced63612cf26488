//! OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions` and
//! `POST /v1/chat/completions`, so the `openai` package (and gateways that route on
//! `model`) reach the base model and every generation tag. Each choice is one request to
//! the predictor: the same admission, limits and metrics as `/predict`.

pub mod errors;
pub mod wire;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::StringRejection;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorKind};
use super::routes::{predict_api_error, predict_error};
use super::sse::ServerSentEvent;
use super::state::AppState;
use crate::infer::{
    Input, Parameters, PredictError, PredictResponse, Prediction, PredictionEntry, Predictor,
    Prompt, Request, Streaming,
};
use crate::model::{ChatPiece, FinishReason};
use crate::tags::{HeadSpec, Segment, TagKind, Template};
use errors::{checked_body, V1Error};
use wire::*;

/// Choices per prompt at most (`n`).
pub const MAX_CHOICES: usize = 8;
/// Stop strings at most (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// Completions' `max_tokens` when none is sent (OpenAI's default).
const COMPLETION_MAX_TOKENS: usize = 16;

type Shared = State<Arc<AppState>>;

/// What `model` names.
enum Target {
    Base,
    /// A function tag that generates text.
    Tag(String),
}

/// The base model's id on these routes: its catalogue name (`smollm2-135m`), or its
/// file's stem. Its GGUF name (`general.name`) is taken as `model` too.
fn base_id(p: &Predictor) -> String {
    crate::model::catalogue::short_name(&p.model.path)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn resolve(p: &Predictor, model: &str) -> Result<Target, V1Error> {
    if model == base_id(p) || model == p.model.name {
        return Ok(Target::Base);
    }
    let tags = p.registry.snapshot();
    match tags.get(model) {
        Some(b) if b.manifest.kind == TagKind::Function && b.manifest.template.is_some() => {
            match &b.manifest.head {
                None => Ok(Target::Tag(model.to_string())),
                Some(head) => {
                    let kind = match head {
                        HeadSpec::Regression { .. } => "regression",
                        HeadSpec::Classification { .. } => "classification",
                    };
                    Err(V1Error::invalid(
                        "model",
                        format!(
                            "<{model}> answers with a {kind} head, not text: use POST /predict"
                        ),
                    ))
                }
            }
        }
        _ => Err(V1Error::model_not_found(model)),
    }
}

/// The generation tags: function tags with a template and no head.
fn generation_tags(p: &Predictor) -> Vec<String> {
    let tags = p.registry.snapshot();
    tags.tags
        .values()
        .filter(|b| {
            b.manifest.kind == TagKind::Function
                && b.manifest.head.is_none()
                && b.manifest.template.is_some()
        })
        .map(|b| b.name().to_string())
        .collect()
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

/// `tags` of a request with tag `name` as its model: the replacements of the domain tags
/// its template names, by name or (two of them) as `source` and `target`.
fn domain_choices(
    p: &Predictor,
    name: &str,
    asked: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, V1Error> {
    let tags = p.registry.snapshot();
    let template = tags
        .get(name)
        .and_then(|b| b.manifest.template.clone())
        .unwrap_or_default();
    let mut named: Vec<String> = Vec::new();
    for t in Template::parse(&template).tags() {
        let is_domain = tags
            .get(t)
            .is_some_and(|b| b.manifest.kind == TagKind::Domain);
        if is_domain && !named.iter().any(|n| n == t) {
            named.push(t.to_string());
        }
    }
    let mut out = BTreeMap::new();
    for (key, to) in asked {
        let from = match key.as_str() {
            "source" | "target" if named.len() == 2 => named[usize::from(key == "target")].clone(),
            _ if named.contains(key) => key.clone(),
            _ => {
                return Err(V1Error::invalid(
                    "tags",
                    format!(
                        "<{name}>'s template names the domain tags {named:?}: `tags` keys are \
                         those names{}, not `{key}`",
                        if named.len() == 2 {
                            " or `source` / `target`"
                        } else {
                            ""
                        }
                    ),
                ))
            }
        };
        if !tags
            .get(to)
            .is_some_and(|b| b.manifest.kind == TagKind::Domain)
        {
            return Err(V1Error::invalid(
                "tags",
                format!("`tags`: <{to}> is not a served domain tag (GET /tags lists them)"),
            ));
        }
        if out.insert(from.clone(), to.clone()).is_some() {
            return Err(V1Error::invalid(
                "tags",
                format!("`tags` replaces <{from}> twice"),
            ));
        }
    }
    Ok(out)
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
    let run = || -> Result<Plan, V1Error> {
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
    };
    let plan = match run() {
        Ok(plan) => plan,
        Err(e) => return e.into_response(),
    };
    let format = Format {
        chat: false,
        id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        created: now(),
        model: req.model.clone(),
        fingerprint: fingerprint(&s),
    };
    serve(s, plan, format, &req.sampling).await
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
    let run = || -> Result<Plan, V1Error> {
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
                    .ok_or_else(|| {
                        V1Error::invalid("messages", "a tag's chat needs a user message")
                    })?;
                let prompt = target_prompt(p, &target, &req.sampling)?;
                (prompt, Input::Text(last_user.1.clone()))
            }
        };
        Ok(Plan {
            requests: choices(&prompt, vec![input], &params, n, req.sampling.stream),
            n,
        })
    };
    let plan = match run() {
        Ok(plan) => plan,
        Err(e) => return e.into_response(),
    };
    let format = Format {
        chat: true,
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: now(),
        model: req.model.clone(),
        fingerprint: fingerprint(&s),
    };
    serve(s, plan, format, &req.sampling).await
}

fn fingerprint(s: &AppState) -> String {
    let f = s
        .predictor
        .get()
        .map_or("", |p| p.model.fingerprint.as_str());
    format!("fp_{}", &f[..f.len().min(12)])
}

/// The messages as (role, text); `developer` is read as `system`.
fn chat_messages(messages: &[ChatMessage]) -> Result<Vec<(&'static str, String)>, V1Error> {
    if messages.is_empty() {
        return Err(V1Error::invalid("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(V1Error::invalid(
                        "messages",
                        format!("messages[{i}]: role `{other}` is not supported (system, developer, user, assistant)"),
                    ))
                }
            };
            let text = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(V1Error::invalid(
                                    "messages",
                                    format!("messages[{i}]: content parts of type `{kind}` are not supported (text only)"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok((role, text))
        })
        .collect()
}

/// The base model's chat prompt: the template's own text as it is, each message's content
/// in a slot of its own (plain text: it cannot forge a turn).
fn chat_prompt(pieces: Vec<ChatPiece>, messages: &[(&str, String)]) -> (Prompt, Input) {
    let slot = |i: usize| format!("m{i}");
    let segments = pieces
        .into_iter()
        .map(|piece| match piece {
            ChatPiece::Text(t) => Segment::Text(t),
            ChatPiece::Message(i) => Segment::Slot(slot(i)),
        })
        .collect();
    let values = messages
        .iter()
        .enumerate()
        .map(|(i, (_, text))| (slot(i), text.clone()))
        .collect();
    (
        Prompt::Template(Template::from_segments(segments)),
        Input::Slots(values),
    )
}

/// The prompt a completion runs: the base model on the text as it is, or the tag's
/// template (its domain tags replaced as `tags` says).
fn target_prompt(p: &Predictor, target: &Target, s: &Sampling) -> Result<Prompt, V1Error> {
    match target {
        Target::Base => {
            if s.tags.is_some() {
                return Err(V1Error::invalid(
                    "tags",
                    "`tags` chooses a tag template's domain tags: send a tag as `model`",
                ));
            }
            Ok(Prompt::Template(Template::from_segments(vec![
                Segment::Slot("prompt".into()),
            ])))
        }
        Target::Tag(name) => Ok(Prompt::Function {
            name: name.clone(),
            domains: domain_choices(p, name, s.tags.as_ref().unwrap_or(&BTreeMap::new()))?,
        }),
    }
}

/// The requests of one call, `n` per prompt.
struct Plan {
    requests: Vec<Request>,
    n: usize,
}

/// How answers are written: completions or chat, and what every chunk repeats.
struct Format {
    chat: bool,
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
}

fn finish(reason: FinishReason) -> String {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    }
    .into()
}

/// The generated text of a one-input response.
fn generated(resp: &PredictResponse) -> Option<(&str, FinishReason)> {
    match resp.predictions.first() {
        Some(PredictionEntry::Single(Prediction::Text {
            text,
            finish_reason,
            ..
        })) => Some((text, *finish_reason)),
        _ => None,
    }
}

/// Usage over the choices: each prompt counted once (its first choice), every generated
/// token.
fn usage(resps: &[&PredictResponse], n: usize) -> CompletionUsage {
    let mut u = CompletionUsage::default();
    for (i, r) in resps.iter().enumerate() {
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
        return stream(streams, plan.n, format, include_usage, permit, stop).into_response();
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
    let usage = usage(&answers.iter().collect::<Vec<_>>(), plan.n);
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
        Json(Completion {
            id: format.id,
            object: "text_completion".into(),
            created: format.created,
            model: format.model,
            system_fingerprint: format.fingerprint,
            choices: texts
                .into_iter()
                .enumerate()
                .map(|(index, (text, reason))| CompletionChoice {
                    index,
                    text: text.to_string(),
                    logprobs: None,
                    finish_reason: Some(finish(reason)),
                })
                .collect(),
            usage: Some(usage),
        })
        .into_response()
    }
}

/// What a streamed choice has to say next.
enum Step {
    Piece(usize, String),
    Finished(usize, Result<PredictResponse, PredictError>),
}

/// One choice's steps: its pieces as they are decoded, then its answer.
fn choice_steps(index: usize, st: Streaming) -> impl futures_util::Stream<Item = Step> {
    futures_util::stream::unfold(Some(st), move |st| async move {
        let Streaming { mut pieces, answer } = st?;
        match pieces.recv().await {
            Some(text) => Some((Step::Piece(index, text), Some(Streaming { pieces, answer }))),
            None => Some((
                Step::Finished(index, answer.wait().await.map(|(r, _)| r)),
                None,
            )),
        }
    })
}

impl Format {
    /// A chunk for choice `index`: a piece of text, or its end.
    fn chunk(
        &self,
        index: usize,
        text: Option<String>,
        reason: Option<String>,
        usage: Option<CompletionUsage>,
    ) -> serde_json::Value {
        let choices = |f: &dyn Fn() -> serde_json::Value| {
            if usage.is_some() {
                serde_json::Value::Array(Vec::new())
            } else {
                serde_json::Value::Array(vec![f()])
            }
        };
        if self.chat {
            let delta = Delta {
                role: None,
                content: text,
            };
            let choice = ChatChunkChoice {
                index,
                delta,
                logprobs: None,
                finish_reason: reason,
            };
            serde_json::json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": self.fingerprint,
                "choices": choices(&|| serde_json::to_value(&choice).unwrap_or_default()),
                "usage": usage,
            })
        } else {
            let choice = CompletionChoice {
                index,
                text: text.unwrap_or_default(),
                logprobs: None,
                finish_reason: reason,
            };
            serde_json::json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": self.fingerprint,
                "choices": choices(&|| serde_json::to_value(&choice).unwrap_or_default()),
                "usage": usage,
            })
        }
    }

    /// A chat choice's first chunk names the role.
    fn opening(&self, index: usize) -> Option<serde_json::Value> {
        self.chat.then(|| {
            let mut c = self.chunk(index, Some(String::new()), None, None);
            c["choices"][0]["delta"]["role"] = "assistant".into();
            c
        })
    }
}

/// OpenAI's stream: `data: {chunk}` events for every choice as it decodes, a usage chunk
/// if asked, then `data: [DONE]`; a failure is a last `data: {"error": ...}`. The permit
/// and the generations live as long as the stream; a client that leaves ends them, and so
/// does the server shutting down.
fn stream(
    choices: Vec<Streaming>,
    n: usize,
    format: Format,
    include_usage: bool,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let _permit = permit;
        let json = |v: &serde_json::Value| v.to_string();
        for i in 0..choices.len() {
            if let Some(c) = format.opening(i) {
                if tx.send(json(&c)).await.is_err() {
                    return;
                }
            }
        }
        let mut answers: Vec<Option<PredictResponse>> = vec![None; choices.len()];
        let mut steps = futures_util::stream::select_all(
            choices
                .into_iter()
                .enumerate()
                .map(|(i, st)| Box::pin(choice_steps(i, st))),
        );
        loop {
            let step = tokio::select! {
                step = steps.next() => step,
                () = async { let _ = stop.wait_for(|stopping| *stopping).await; } => {
                    let e = ApiError::new(ErrorKind::ShuttingDown, "the server is shutting down; the generation was stopped");
                    let _ = tx.send(error_chunk(V1Error::from(e))).await;
                    return;
                }
                () = tx.closed() => return,
            };
            let event = match step {
                None => break,
                Some(Step::Piece(i, text)) => json(&format.chunk(i, Some(text), None, None)),
                Some(Step::Finished(i, Ok(resp))) => {
                    let reason = generated(&resp).map(|(_, r)| finish(r));
                    answers[i] = Some(resp);
                    let mut c = format.chunk(i, None, reason, None);
                    if format.chat {
                        c["choices"][0]["delta"] = serde_json::json!({});
                    }
                    json(&c)
                }
                Some(Step::Finished(_, Err(e))) => {
                    let _ = tx
                        .send(error_chunk(V1Error::from(predict_api_error(e))))
                        .await;
                    return;
                }
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        if include_usage {
            let done: Vec<&PredictResponse> = answers.iter().flatten().collect();
            let u = usage(&done, n);
            let _ = tx.send(json(&format.chunk(0, None, None, Some(u)))).await;
        }
        let _ = tx.send("[DONE]".into()).await;
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok(Event::default().data(data)), rx))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

fn error_chunk(e: V1Error) -> String {
    serde_json::to_string(&e.body().1).unwrap_or_default()
}
