//! OpenAI's streams: `data: {chunk}` events per choice as it decodes, then `data: [DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::StreamExt;

use super::errors::V1Error;
use super::wire::{ChatChunkChoice, CompletionChoice, CompletionUsage, Delta};
use super::{finish, generated, usage, Format};
use crate::http::error::{ApiError, ErrorKind};
use crate::http::routes::predict_api_error;
use crate::infer::{PredictError, PredictResponse, Streaming};

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
pub(super) fn stream(
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
