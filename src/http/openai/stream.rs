//! OpenAI's streams: `data: {chunk}` events per choice as it decodes, then `data: [DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::StreamExt;

use super::errors::V1Error;
use super::wire::{ChatChunkChoice, ChatCompletionChunk, CompletionChoice, CompletionUsage, Delta};
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

/// What one chunk says of a choice.
enum Say {
    /// A chat choice's first chunk names the role.
    Role,
    Text(String),
    /// The choice ended, for this reason.
    End(Option<String>),
}

impl Format {
    /// A chunk for choice `index`, as JSON text.
    fn chunk(&self, index: usize, say: Say) -> String {
        let (role, text, finish_reason) = match say {
            Say::Role => (Some("assistant".to_string()), Some(String::new()), None),
            Say::Text(t) => (None, Some(t), None),
            Say::End(reason) => (None, None, reason),
        };
        if self.chat {
            let choice = ChatChunkChoice {
                index,
                delta: Delta {
                    role,
                    content: text,
                },
                logprobs: None,
                finish_reason,
            };
            self.chat_chunk(vec![choice], None)
        } else {
            let choice = CompletionChoice {
                index,
                text: text.unwrap_or_default(),
                logprobs: None,
                finish_reason,
            };
            to_json(&self.completion(vec![choice], None))
        }
    }

    /// The last chunk before `[DONE]` when asked: usage, and no choices.
    fn usage_chunk(&self, usage: CompletionUsage) -> String {
        if self.chat {
            self.chat_chunk(Vec::new(), Some(usage))
        } else {
            to_json(&self.completion(Vec::new(), Some(usage)))
        }
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<CompletionUsage>) -> String {
        to_json(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.fingerprint.clone(),
            choices,
            usage,
        })
    }
}

fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
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
        if format.chat {
            for i in 0..choices.len() {
                if tx.send(format.chunk(i, Say::Role)).await.is_err() {
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
                Some(Step::Piece(i, text)) => format.chunk(i, Say::Text(text)),
                Some(Step::Finished(i, Ok(resp))) => {
                    let reason = generated(&resp).map(|(_, r)| finish(r));
                    answers[i] = Some(resp);
                    format.chunk(i, Say::End(reason))
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
            // Every choice has answered: a failure returned above.
            let u = usage(answers.iter().flatten(), n);
            let _ = tx.send(format.usage_chunk(u)).await;
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
    to_json(&e.body().1)
}
