//! The durable job store: SQLite (embedded, the default) or Postgres (several API servers
//! and workers sharing one queue), through one code path (sqlx's `Any` driver).
//!
//! Datasets and checkpoints live in the database too, so a worker on another machine
//! needs nothing but the database URL and the shared tags directory.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

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

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        stage BIGINT NOT NULL,
        tag TEXT NOT NULL,
        spec TEXT NOT NULL,
        step BIGINT NOT NULL DEFAULT 0,
        total_steps BIGINT NOT NULL,
        loss DOUBLE PRECISION,
        best_loss DOUBLE PRECISION,
        eval TEXT,
        error TEXT,
        attempts BIGINT NOT NULL DEFAULT 0,
        resumed_from_step BIGINT NOT NULL DEFAULT 0,
        worker TEXT,
        lease_until BIGINT,
        cancel_requested BIGINT NOT NULL DEFAULT 0,
        published_version BIGINT,
        checkpoint_step BIGINT,
        checkpoint BYTEA,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        started_at BIGINT,
        finished_at BIGINT,
        run_started_at BIGINT,
        run_start_step BIGINT
    )",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at)",
    // The training curve: one point per heartbeat, and one at every evaluation.
    "CREATE TABLE IF NOT EXISTS job_points (
        job_id TEXT NOT NULL,
        step BIGINT NOT NULL,
        loss DOUBLE PRECISION,
        eval_loss DOUBLE PRECISION,
        at BIGINT NOT NULL,
        PRIMARY KEY (job_id, step)
    )",
    "CREATE TABLE IF NOT EXISTS datasets (
        id TEXT PRIMARY KEY,
        name TEXT,
        records BIGINT NOT NULL,
        bytes BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        content TEXT NOT NULL,
        created_at BIGINT NOT NULL
    )",
];

const JOB_COLUMNS: &str = "id, state, stage, tag, step, total_steps, loss, best_loss, eval, error, attempts, \
    resumed_from_step, worker, published_version, cancel_requested, created_at, updated_at, started_at, \
    finished_at, run_started_at, run_start_step";

fn job_from(row: &AnyRow) -> Result<Job> {
    let state: String = row.try_get("state")?;
    let step: i64 = row.try_get("step")?;
    let total: i64 = row.try_get("total_steps")?;
    let run_started: Option<i64> = row.try_get("run_started_at")?;
    let run_start_step: Option<i64> = row.try_get("run_start_step")?;
    let state = JobState::parse(&state).with_context(|| format!("unknown job state `{state}`"))?;
    let eta_seconds = match (state, run_started, run_start_step) {
        (JobState::Running, Some(t0), Some(s0)) if step > s0 => {
            let per_step = (now_ms() - t0) as f64 / 1000.0 / (step - s0) as f64;
            Some(per_step * (total - step) as f64)
        }
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

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DatasetInfo {
    pub id: String,
    pub name: Option<String>,
    pub records: i64,
    pub bytes: i64,
    pub sha256: String,
    pub created_at: i64,
}

#[derive(Clone)]
pub struct JobStore {
    pool: AnyPool,
}

impl JobStore {
    /// `sqlite://PATH` (created if missing) or `postgres://...`.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let url = if let Some(path) = url.strip_prefix("sqlite://") {
            if let Some(parent) =
                std::path::Path::new(path.split('?').next().unwrap_or(path)).parent()
            {
                std::fs::create_dir_all(parent).ok();
            }
            if url.contains('?') {
                url.to_string()
            } else {
                format!("{url}?mode=rwc")
            }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url.to_string()
        } else {
            bail!("unsupported database URL `{url}` (use sqlite://PATH or postgres://...)");
        };
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .connect(&url)
            .await
            .with_context(|| format!("connecting to the job store {}", redact(&url)))?;
        if sqlite {
            // Several processes (API server, workers) may share the file.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        let store = Self { pool };
        for stmt in SCHEMA {
            sqlx::query(stmt)
                .execute(&store.pool)
                .await
                .context("creating the job store schema")?;
        }
        Ok(store)
    }

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

    /// Stores a dataset's text (up to the dataset size limit); its sha256 is computed on
    /// the blocking pool, not on the async threads.
    pub async fn add_dataset(
        &self,
        name: Option<&str>,
        content: String,
        records: i64,
    ) -> Result<DatasetInfo> {
        use sha2::Digest;
        let id = uuid::Uuid::new_v4().to_string();
        let (content, sha) = tokio::task::spawn_blocking(move || {
            let sha = hex::encode(sha2::Sha256::digest(content.as_bytes()));
            (content, sha)
        })
        .await?;
        let content = content.as_str();
        let now = now_ms();
        sqlx::query("INSERT INTO datasets (id, name, records, bytes, sha256, content, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(&id)
            .bind(name)
            .bind(records)
            .bind(content.len() as i64)
            .bind(&sha)
            .bind(content)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(DatasetInfo {
            id,
            name: name.map(String::from),
            records,
            bytes: content.len() as i64,
            sha256: sha,
            created_at: now,
        })
    }

    pub async fn dataset_content(&self, id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT content FROM datasets WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get::<String, _>("content").map_err(Into::into))
            .transpose()
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}
