//! Submitting a training job (`POST /train`'s use case): resolve and parse its datasets,
//! check it against the model, the registered tags and the data, store the datasets it
//! brought inline and queue the spec. Everything that can be checked is checked here, so
//! a bad request is refused now, not a failed job later.

use std::path::{Component, Path as FsPath, PathBuf};

use crate::jobs::{DatasetRef, Job, JobSpec, JobStore, TrainRequest};
use crate::tags::Registry;
use crate::train::Dataset;

/// Where datasets may come from, and how large.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Datasets named by `{"path": ...}` must lie under this directory (none: refused).
    pub data_root: Option<PathBuf>,
    pub max_dataset_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The request is wrong; the message says how.
    #[error("{0}")]
    Invalid(String),
    /// A dataset file is over the size limit.
    #[error("{0}")]
    TooLarge(String),
    /// The store or a task failed.
    #[error("{0}")]
    Failed(String),
}

/// Checks `req` and queues it; answers the queued job.
pub async fn submit(
    store: &JobStore,
    registry: &Registry,
    limits: &Limits,
    req: &TrainRequest,
) -> Result<Job, SubmitError> {
    let job = req.to_job().map_err(SubmitError::Invalid)?;
    let (train_text, train_id) = dataset_text(limits, store, &req.dataset, "dataset").await?;
    let (train_text, train_data) = parse(train_text, "dataset").await?;
    let eval = match &req.eval_dataset {
        Some(r) => {
            let (text, id) = dataset_text(limits, store, r, "eval_dataset").await?;
            let (text, data) = parse(text, "eval_dataset").await?;
            Some((text, id, data))
        }
        None => None,
    };
    // Full validation (tags, template slots against the data, target against the head,
    // hyperparameter bounds) without building a trainer; it also sizes the run in steps.
    let check_job = job.clone();
    let eval_data = eval.as_ref().map(|(_, _, d)| d.clone());
    let frozen = registry.snapshot();
    let data = train_data.clone();
    let total_steps = tokio::task::spawn_blocking(move || {
        crate::train::job::check(&check_job, &frozen, &data, eval_data.as_ref())
    })
    .await
    .map_err(|e| SubmitError::Failed(e.to_string()))?
    .map_err(|e| SubmitError::Invalid(format!("{e:#}")))?;
    let store_text = |text: String, id: Option<String>, n: usize| {
        let store = store.clone();
        async move {
            match id {
                Some(id) => Ok(id),
                None => store
                    .add_dataset(None, text, n as i64)
                    .await
                    .map(|d| d.id)
                    .map_err(|e| SubmitError::Failed(format!("{e:#}"))),
            }
        }
    };
    let dataset = store_text(train_text, train_id, train_data.records.len()).await?;
    let eval_dataset = match eval {
        Some((text, id, d)) => Some(store_text(text, id, d.records.len()).await?),
        None => None,
    };
    let tag = job.tags.join(",");
    let (stage, steps) = (job.stage as i64, total_steps as i64);
    let spec = serde_json::to_value(JobSpec {
        job,
        dataset,
        eval_dataset,
    })
    .map_err(|e| SubmitError::Failed(e.to_string()))?;
    store
        .submit(stage, &tag, steps, &spec)
        .await
        .map_err(|e| SubmitError::Failed(format!("{e:#}")))
}

/// The JSONL text of a dataset reference, and whether it must be stored with the job.
async fn dataset_text(
    limits: &Limits,
    store: &JobStore,
    r: &DatasetRef,
    what: &str,
) -> Result<(String, Option<String>), SubmitError> {
    match r {
        DatasetRef::Id { id } => {
            let text = store
                .dataset_content(id)
                .await
                .map_err(|e| SubmitError::Failed(format!("{e:#}")))?;
            let text = text.ok_or_else(|| {
                SubmitError::Invalid(format!("{what}: no dataset with id `{id}`"))
            })?;
            Ok((text, Some(id.clone())))
        }
        DatasetRef::Path { path } => {
            let root = limits.data_root.clone().ok_or_else(|| {
                SubmitError::Invalid(format!(
                    "{what}: this server has no data root; upload with POST /datasets"
                ))
            })?;
            let (path, what, limit) = (path.clone(), what.to_string(), limits.max_dataset_bytes);
            // Up to the dataset size limit of file reading: off the async threads.
            let text =
                tokio::task::spawn_blocking(move || read_under_root(&root, &path, &what, limit))
                    .await
                    .map_err(|e| SubmitError::Failed(e.to_string()))??;
            Ok((text, None))
        }
        DatasetRef::Records { records } => {
            let lines: Vec<String> = records.iter().map(|r| r.to_string()).collect();
            Ok((lines.join("\n"), None))
        }
    }
}

/// A dataset file named relative to the data root, never outside it.
fn read_under_root(
    root: &FsPath,
    path: &str,
    what: &str,
    limit: usize,
) -> Result<String, SubmitError> {
    let rel = FsPath::new(path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(SubmitError::Invalid(format!(
            "{what}: `{path}` must be a relative path without `..`"
        )));
    }
    let full = root.join(rel);
    let (canon_root, canon) = (std::fs::canonicalize(root), std::fs::canonicalize(&full));
    match (canon_root, canon) {
        (Ok(r), Ok(f)) if f.starts_with(&r) => {}
        _ => {
            return Err(SubmitError::Invalid(format!(
                "{what}: no file `{path}` under the data root"
            )))
        }
    }
    let meta =
        std::fs::metadata(&full).map_err(|e| SubmitError::Invalid(format!("{what}: {e}")))?;
    if meta.len() as usize > limit {
        return Err(SubmitError::TooLarge(format!(
            "{what}: `{path}` is over the dataset size limit"
        )));
    }
    std::fs::read_to_string(&full)
        .map_err(|e| SubmitError::Invalid(format!("{what}: reading `{path}`: {e}")))
}

/// Parses JSONL (up to the dataset size limit) on the blocking pool; hands the text back.
pub async fn parse(text: String, what: &str) -> Result<(String, Dataset), SubmitError> {
    let what = what.to_string();
    tokio::task::spawn_blocking(move || {
        Dataset::from_jsonl(&text)
            .map(|d| (text, d))
            .map_err(|e| SubmitError::Invalid(format!("{what}: {e:#}")))
    })
    .await
    .map_err(|e| SubmitError::Failed(e.to_string()))?
}
