//! A job's types as clients and workers see them, and their rows.

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::now_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// A job as clients see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Job {
    pub id: String,
    pub state: JobState,
    pub stage: i64,
    pub tag: String,
    pub step: i64,
    pub total_steps: i64,
    /// Training loss of the latest step.
    pub loss: Option<f64>,
    /// Best held-out loss so far.
    pub best_loss: Option<f64>,
    /// Latest held-out metrics; null until the first evaluation.
    #[schema(value_type = Option<Object>)]
    pub eval: serde_json::Value,
    pub error: Option<String>,
    pub attempts: i64,
    /// Step of the checkpoint the latest attempt resumed from (0: from scratch).
    pub resumed_from_step: i64,
    pub worker: Option<String>,
    /// Version of the tag this job published.
    pub published_version: Option<i64>,
    pub cancel_requested: bool,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Seconds to completion, estimated from the pace so far.
    pub eta_seconds: Option<f64>,
}

/// The columns [`job_from`] reads.
pub(super) const JOB_COLUMNS: &str = "id, state, stage, tag, step, total_steps, loss, best_loss, eval, error, attempts, \
    resumed_from_step, worker, published_version, cancel_requested, created_at, updated_at, started_at, \
    finished_at, run_started_at, run_start_step";

pub(super) fn job_from(row: &AnyRow) -> Result<Job> {
    let state: String = row.try_get("state")?;
    let step: i64 = row.try_get("step")?;
    let total: i64 = row.try_get("total_steps")?;
    let run_started: Option<i64> = row.try_get("run_started_at")?;
    let run_start_step: Option<i64> = row.try_get("run_start_step")?;
    let state = JobState::parse(&state).with_context(|| format!("unknown job state `{state}`"))?;
    let eta_seconds = match (state, run_started, run_start_step) {
        (JobState::Running, Some(t0), Some(s0)) => eta_seconds(t0, s0, step, total, now_ms()),
        _ => None,
    };
    let eval: Option<String> = row.try_get("eval")?;
    Ok(Job {
        id: row.try_get("id")?,
        state,
        stage: row.try_get("stage")?,
        tag: row.try_get("tag")?,
        step,
        total_steps: total,
        loss: row.try_get("loss")?,
        best_loss: row.try_get("best_loss")?,
        eval: eval
            .and_then(|e| serde_json::from_str(&e).ok())
            .unwrap_or(serde_json::Value::Null),
        error: row.try_get("error")?,
        attempts: row.try_get("attempts")?,
        resumed_from_step: row.try_get("resumed_from_step")?,
        worker: row.try_get("worker")?,
        published_version: row.try_get("published_version")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        eta_seconds,
    })
}

/// A job a worker has claimed: its record, its spec and the checkpoint to resume from.
pub struct Claimed {
    pub job: Job,
    pub spec: serde_json::Value,
    pub checkpoint: Option<Vec<u8>>,
}

/// What a worker reports with each heartbeat.
#[derive(Debug, Clone, Default)]
pub struct ProgressReport {
    pub step: i64,
    pub loss: Option<f64>,
    pub best_loss: Option<f64>,
    pub eval: Option<serde_json::Value>,
    /// Held-out loss measured at this step, if it was an evaluation step.
    pub eval_loss: Option<f64>,
}

/// One point of a job's training curve.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CurvePoint {
    pub step: i64,
    /// Training loss of this step.
    pub loss: Option<f64>,
    /// Held-out loss, where this step was an evaluation step.
    pub eval_loss: Option<f64>,
    /// Unix milliseconds.
    pub at: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Heartbeat {
    /// Keep going.
    Continue,
    /// A client asked to cancel.
    Cancel,
    /// The lease was lost (another worker took the job over): stop without writing.
    Lost,
}

/// Seconds to `total` steps at the pace of this run so far: it began at `t0_ms` from step
/// `s0` and is at `step` at `now_ms`. Unknown before its first step (a resumed run's pace
/// counts from its resumption: the steps before it were someone else's).
fn eta_seconds(t0_ms: i64, s0: i64, step: i64, total: i64, now_ms: i64) -> Option<f64> {
    (step > s0).then(|| {
        let per_step = (now_ms - t0_ms) as f64 / 1000.0 / (step - s0) as f64;
        per_step * (total - step).max(0) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_is_the_pace_of_this_run_times_the_steps_left() {
        // 10 steps in 5 s since the run began at step 20: 0.5 s a step, 70 left.
        assert_eq!(eta_seconds(1_000, 20, 30, 100, 6_000), Some(35.0));
        assert_eq!(eta_seconds(1_000, 20, 20, 100, 6_000), None);
        assert_eq!(eta_seconds(1_000, 0, 100, 100, 6_000), Some(0.0));
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for s in ["queued", "running", "succeeded", "failed", "cancelled"] {
            assert_eq!(JobState::parse(s).unwrap().as_str(), s);
        }
        assert_eq!(JobState::parse("paused"), None);
    }
}
