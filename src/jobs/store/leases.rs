//! What workers ask of the store: claim a job under a lease, heartbeat, checkpoint, hand
//! back, finish. Every write after the claim holds only while this worker holds the lease.

use std::time::Duration;

use anyhow::Result;
use sqlx::Row;

use super::job::{job_from, Claimed, Heartbeat, JobState, ProgressReport, JOB_COLUMNS};
use super::{now_ms, JobStore};

/// Optional floats written into a statement without ever binding a NULL: sqlx 0.8.6's
/// Any driver binds a NULL f64 as a float4 on Postgres, and the statement it prepares that
/// way then refuses every f64 on that connection ("incorrect binary data format in bind
/// parameter"): a job without held-out data (best_loss NULL) broke the heartbeats of the
/// next job on the same connection. A NULL goes into the SQL text instead, so each
/// combination is its own prepared statement with consistent types.
struct OptionalFloats {
    next: usize,
    values: Vec<f64>,
}

impl OptionalFloats {
    /// For a statement whose other parameters are $1..=$n.
    fn after(n: usize) -> Self {
        Self {
            next: n + 1,
            values: Vec::new(),
        }
    }

    /// The SQL for `v`: its placeholder, or NULL.
    fn sql(&mut self, v: Option<f64>) -> String {
        match v {
            Some(x) => {
                self.values.push(x);
                self.next += 1;
                format!("${}", self.next - 1)
            }
            None => "NULL".into(),
        }
    }

    fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        self.values.into_iter().fold(query, |q, v| q.bind(v))
    }
}

impl JobStore {
    /// Claims the oldest queued job, or a running one whose worker stopped heartbeating.
    pub async fn claim(&self, worker: &str, lease: Duration) -> Result<Option<Claimed>> {
        let now = now_ms();
        let row = sqlx::query(
            "UPDATE jobs SET state = 'running', worker = $1, lease_until = $2, attempts = attempts + 1,
                 started_at = COALESCE(started_at, $3), updated_at = $3, run_started_at = $3, run_start_step = step,
                 resumed_from_step = COALESCE(checkpoint_step, 0)
             WHERE id = (SELECT id FROM jobs WHERE state = 'queued' OR (state = 'running' AND lease_until < $3)
                         ORDER BY created_at LIMIT 1)
               AND (state = 'queued' OR (state = 'running' AND lease_until < $3))
             RETURNING id",
        )
        .bind(worker)
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let id: String = row.try_get("id")?;
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, spec, checkpoint FROM jobs WHERE id = $1"
        ))
        .bind(&id)
        .fetch_one(&self.pool)
        .await?;
        let spec: String = row.try_get("spec")?;
        Ok(Some(Claimed {
            job: job_from(&row)?,
            spec: serde_json::from_str(&spec)?,
            checkpoint: row.try_get("checkpoint")?,
        }))
    }

    /// Hands a running job back to the queue (its worker is shutting down), if this worker
    /// still holds it: claimable at once, and this attempt does not count against it.
    pub async fn release(&self, id: &str, worker: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE jobs SET state = 'queued', worker = NULL, lease_until = NULL, updated_at = $1,
                 attempts = attempts - 1
             WHERE id = $2 AND worker = $3 AND state = 'running'",
        )
        .bind(now_ms())
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Extends the lease and records progress, if this worker still holds the job.
    pub async fn heartbeat(
        &self,
        id: &str,
        worker: &str,
        lease: Duration,
        p: &ProgressReport,
    ) -> Result<Heartbeat> {
        let now = now_ms();
        let mut floats = OptionalFloats::after(6);
        let (loss, best) = (floats.sql(p.loss), floats.sql(p.best_loss));
        let sql = format!(
            "UPDATE jobs SET lease_until = $1, updated_at = $2, step = $3, loss = {loss}, best_loss = {best},
                 eval = COALESCE($4, eval)
             WHERE id = $5 AND worker = $6 AND state = 'running'"
        );
        let update = sqlx::query(&sql)
            .bind(now + lease.as_millis() as i64)
            .bind(now)
            .bind(p.step)
            .bind(p.eval.as_ref().map(|e| e.to_string()))
            .bind(id)
            .bind(worker);
        let done = floats
            .bind(update)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if done == 0 {
            return Ok(Heartbeat::Lost);
        }
        // A resumed attempt repeats steps after its checkpoint: the latest run's point wins.
        let mut floats = OptionalFloats::after(3);
        let (loss, eval_loss) = (floats.sql(p.loss), floats.sql(p.eval_loss));
        let sql = format!(
            "INSERT INTO job_points (job_id, step, at, loss, eval_loss) VALUES ($1, $2, $3, {loss}, {eval_loss})
             ON CONFLICT (job_id, step) DO UPDATE SET loss = excluded.loss,
                 eval_loss = excluded.eval_loss, at = excluded.at"
        );
        let insert = sqlx::query(&sql).bind(id).bind(p.step).bind(now);
        floats.bind(insert).execute(&self.pool).await?;
        let row = sqlx::query("SELECT cancel_requested FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(if row.try_get::<i64, _>("cancel_requested")? != 0 {
            Heartbeat::Cancel
        } else {
            Heartbeat::Continue
        })
    }

    /// Stores a checkpoint (atomically, with its step) if this worker still holds the job.
    pub async fn save_checkpoint(
        &self,
        id: &str,
        worker: &str,
        step: i64,
        bytes: Vec<u8>,
    ) -> Result<bool> {
        let n = sqlx::query("UPDATE jobs SET checkpoint = $1, checkpoint_step = $2, updated_at = $3 WHERE id = $4 AND worker = $5 AND state = 'running'")
            .bind(bytes)
            .bind(step)
            .bind(now_ms())
            .bind(id)
            .bind(worker)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Ends the job (if this worker still holds it).
    pub async fn finish(
        &self,
        id: &str,
        worker: &str,
        state: JobState,
        error: Option<&str>,
        published_version: Option<i64>,
        eval: Option<&serde_json::Value>,
    ) -> Result<bool> {
        let now = now_ms();
        let n = sqlx::query(
            "UPDATE jobs SET state = $1, error = $2, published_version = $3, eval = COALESCE($4, eval), finished_at = $5,
                 updated_at = $5, lease_until = NULL, checkpoint = NULL
             WHERE id = $6 AND worker = $7 AND state = 'running'",
        )
        .bind(state.as_str())
        .bind(error)
        .bind(published_version)
        .bind(eval.map(|e| e.to_string()))
        .bind(now)
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }
}
