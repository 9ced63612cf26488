//! Training over HTTP: `POST /train` (its checks in `jobs::submit`), `GET /jobs`,
//! `GET /jobs/{id}`, `GET /jobs/{id}/events`, `DELETE /jobs/{id}`, `POST /datasets`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody, ErrorKind};
use super::sse::ServerSentEvent;
use super::state::AppState;
use crate::jobs::submit::{self, SubmitError};
use crate::jobs::{CurvePoint, DatasetInfo, Job, JobState, TrainRequest};
use crate::json_object::Object;

type Shared = State<Arc<AppState>>;

#[derive(Serialize, ToSchema)]
pub struct Accepted {
    pub id: String,
    #[schema(value_type = String)]
    pub state: JobState,
}

fn refused(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Invalid(m) => ApiError::validation(m),
        SubmitError::TooLarge(m) => ApiError::new(ErrorKind::PayloadTooLarge, m),
        SubmitError::Failed(m) => ApiError::backend(m),
    }
}

/// Queues a training job (stage 1, 2 or 3) after validating it against the model, the
/// registered tags and the data.
#[utoipa::path(post, path = "/train", request_body = TrainRequest,
    responses((status = 202, body = Accepted), (status = 422, description = "Invalid input; the error names the problem", body = ErrorBody), (status = 413, description = "The body is larger than the configured limit", body = ErrorBody),
              (status = 503, body = ErrorBody)), security(("admin" = [])))]
pub async fn train(
    State(s): Shared,
    body: Result<Json<Object<TrainRequest>>, JsonRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let Json(Object(req)) = body?;
    let store = s.jobs()?;
    let registry = &s.predictor()?.registry;
    let limits = submit::Limits {
        data_root: s.config.data_root.clone(),
        max_dataset_bytes: s.config.max_dataset_bytes,
    };
    let queued = submit::submit(store, registry, &limits, &req)
        .await
        .map_err(refused)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            id: queued.id,
            state: queued.state,
        }),
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobFilter {
    /// queued, running, succeeded, failed or cancelled.
    pub state: Option<String>,
    /// At most this many, newest first (default 100).
    pub limit: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

/// Jobs, newest first, optionally in one state.
#[utoipa::path(get, path = "/jobs", params(JobFilter), responses((status = 200, body = JobList), (status = 422, description = "Invalid input; the error names the problem", body = ErrorBody)))]
pub async fn list_jobs(
    State(s): Shared,
    query: Result<Query<JobFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let Query(f) = query?;
    // `?state=` is no filter, as an absent one: the document allows the empty string.
    let state = match f.state.as_deref().filter(|x| !x.is_empty()) {
        Some(x) => Some(
            JobState::parse(x)
                .ok_or_else(|| ApiError::validation(format!("unknown state `{x}`")))?,
        ),
        None => None,
    };
    let jobs = s
        .jobs()?
        .list(state, f.limit.unwrap_or(100).clamp(1, 1000))
        .await
        .map_err(|e| ApiError::backend(format!("{e:#}")))?;
    Ok(Json(JobList { jobs }))
}

async fn find(s: &AppState, id: &str) -> Result<Job, ApiError> {
    s.jobs()?
        .get(id)
        .await
        .map_err(|e| ApiError::backend(format!("{e:#}")))?
        .ok_or_else(|| ApiError::not_found(format!("no job `{id}`")))
}

/// One job: state, stage, step / total, loss, best loss, eval metrics, ETA, error.
#[utoipa::path(get, path = "/jobs/{id}", params(("id" = String, Path)), responses((status = 200, body = Job), (status = 404, description = "No such job", body = ErrorBody)))]
pub async fn get_job(State(s): Shared, Path(id): Path<String>) -> Result<Json<Job>, ApiError> {
    Ok(Json(find(&s, &id).await?))
}

#[derive(Serialize, ToSchema)]
pub struct Curve {
    /// By step: one point per heartbeat (every few seconds) and one per evaluation.
    pub points: Vec<CurvePoint>,
}

/// A job's training curve: training loss, and held-out loss at evaluation steps.
#[utoipa::path(get, path = "/jobs/{id}/curve", params(("id" = String, Path)), responses((status = 200, body = Curve), (status = 404, description = "No such job", body = ErrorBody)))]
pub async fn job_curve(State(s): Shared, Path(id): Path<String>) -> Result<Json<Curve>, ApiError> {
    find(&s, &id).await?;
    let points = s
        .jobs()?
        .curve(&id)
        .await
        .map_err(|e| ApiError::backend(format!("{e:#}")))?;
    Ok(Json(Curve { points }))
}

/// Cancels a job: at once when queued, at its next step when running.
#[utoipa::path(delete, path = "/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, description = "No such job", body = ErrorBody), (status = 409, description = "The job has already ended", body = ErrorBody)), security(("admin" = [])))]
pub async fn cancel_job(State(s): Shared, Path(id): Path<String>) -> Result<Json<Job>, ApiError> {
    let job = find(&s, &id).await?;
    if job.state.is_terminal() {
        return Err(ApiError::new(
            ErrorKind::Conflict,
            format!("job `{id}` already ended ({})", job.state.as_str()),
        ));
    }
    let job = s
        .jobs()?
        .cancel(&id)
        .await
        .map_err(|e| ApiError::backend(format!("{e:#}")))?
        .ok_or_else(|| ApiError::not_found(format!("no job `{id}`")))?;
    Ok(Json(job))
}

/// Server-sent events: the job (as in `GET /jobs/{id}`) each time it changes, until it ends.
#[utoipa::path(get, path = "/jobs/{id}/events", params(("id" = String, Path)),
    responses((status = 200, description = "Server-sent events: each `progress` event's data is the job as JSON (the `Job` schema), until the job ends", content_type = "text/event-stream", body = ServerSentEvent), (status = 404, description = "No such job", body = ErrorBody)))]
pub async fn job_events(
    State(s): Shared,
    Path(id): Path<String>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    find(&s, &id).await?;
    let store = s.jobs()?.clone();
    let stop = s.shutdown.subscribe();
    let stream = futures_util::stream::unfold(
        (store, id, None::<(i64, i64)>, false, stop),
        |(store, id, last, ended, mut stop)| async move {
            if ended || *stop.borrow() {
                return None;
            }
            loop {
                let job = match store.get(&id).await {
                    Ok(Some(j)) => j,
                    _ => return None,
                };
                let key = (job.updated_at, job.step);
                if last != Some(key) || job.state.is_terminal() {
                    let done = job.state.is_terminal();
                    let event = Event::default()
                        .event("progress")
                        .json_data(&job)
                        .unwrap_or_default();
                    return Some((Ok(event), (store, id, Some(key), done, stop)));
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    // Shutting down (or the state is gone): end the stream now.
                    _ = stop.changed() => return None,
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadParams {
    /// A name to remember the dataset by.
    pub name: Option<String>,
}

/// Uploads a JSONL dataset (one JSON object per line); answers its id for `POST /train`.
#[utoipa::path(post, path = "/datasets", params(UploadParams), request_body(content = String, content_type = "application/x-ndjson"),
    responses((status = 201, body = DatasetInfo), (status = 422, description = "Invalid input; the error names the problem", body = ErrorBody), (status = 413, description = "The body is larger than the configured limit", body = ErrorBody)), security(("admin" = [])))]
pub async fn upload_dataset(
    State(s): Shared,
    query: Result<Query<UploadParams>, axum::extract::rejection::QueryRejection>,
    body: Result<String, axum::extract::rejection::StringRejection>,
) -> Result<(StatusCode, Json<DatasetInfo>), ApiError> {
    let Query(p) = query?;
    let text = body?;
    let store = s.jobs()?;
    let (text, data) = submit::parse(text, "dataset").await.map_err(refused)?;
    let info = store
        .add_dataset(p.name.as_deref(), text, data.records.len() as i64)
        .await
        .map_err(|e| ApiError::backend(format!("{e:#}")))?;
    Ok((StatusCode::CREATED, Json(info)))
}
