//! What clients ask of the store: submit a job, read it and its curve, list, cancel.

use anyhow::Result;
use sqlx::Row;

use super::job::{job_from, CurvePoint, Job, JobState, JOB_COLUMNS};
use super::{now_ms, JobStore};

impl JobStore {
    pub async fn submit(
        &self,
        stage: i64,
        tag: &str,
        total_steps: i64,
        spec: &serde_json::Value,
    ) -> Result<Job> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        // The row as inserted: a worker may claim the job before a second read would run,
        // and the submitter is told the state it was accepted in.
        let row = sqlx::query(&format!(
            "INSERT INTO jobs (id, state, stage, tag, spec, total_steps, created_at, updated_at) \
             VALUES ($1, 'queued', $2, $3, $4, $5, $6, $6) RETURNING {JOB_COLUMNS}"
        ))
        .bind(&id)
        .bind(stage)
        .bind(tag)
        .bind(spec.to_string())
        .bind(total_steps)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        job_from(&row)
    }

    pub async fn get(&self, id: &str) -> Result<Option<Job>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from).transpose()
    }

    /// A job's training curve, by step; empty for a job that has not reported yet.
    pub async fn curve(&self, id: &str) -> Result<Vec<CurvePoint>> {
        let rows = sqlx::query(
            "SELECT step, loss, eval_loss, at FROM job_points WHERE job_id = $1 ORDER BY step",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CurvePoint {
                    step: r.try_get("step")?,
                    loss: r.try_get("loss")?,
                    eval_loss: r.try_get("eval_loss")?,
                    at: r.try_get("at")?,
                })
            })
            .collect()
    }

    pub async fn list(&self, state: Option<JobState>, limit: i64) -> Result<Vec<Job>> {
        let rows = match state {
            Some(s) => {
                sqlx::query(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE state = $1 ORDER BY created_at DESC LIMIT $2"
            ))
                .bind(s.as_str())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at DESC LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(job_from).collect()
    }

    /// A queued job is cancelled at once; a running one is asked to stop at its next step.
    pub async fn cancel(&self, id: &str) -> Result<Option<Job>> {
        let now = now_ms();
        sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = $1, updated_at = $1, cancel_requested = 1 WHERE id = $2 AND state = 'queued'")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        sqlx::query("UPDATE jobs SET cancel_requested = 1, updated_at = $1 WHERE id = $2 AND state = 'running'").bind(now).bind(id).execute(&self.pool).await?;
        self.get(id).await
    }
}
