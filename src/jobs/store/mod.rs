//! The durable job store: SQLite (embedded, the default) or Postgres (several API servers
//! and workers sharing one queue), through one code path (sqlx's `Any` driver). The schema
//! is versioned: `src/jobs/migrations/`, embedded and applied on connect.
//!
//! Datasets and checkpoints live in the database too, so a worker on another machine
//! needs nothing but the database URL and the shared tags directory. The statements are
//! grouped by who issues them: `queue.rs` (clients: submit, read, cancel), `leases.rs`
//! (workers: claim, heartbeat, checkpoint, finish), `datasets.rs`; `job.rs` holds the
//! types and the row mapping.

mod datasets;
mod job;
mod leases;
mod queue;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::AnyPool;

pub use datasets::DatasetInfo;
pub use job::{Claimed, CurvePoint, Heartbeat, Job, JobState, ProgressReport};

static MIGRATIONS: Migrator = sqlx::migrate!("src/jobs/migrations");

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
        migrate(&pool).await?;
        Ok(Self { pool })
    }
}

/// Applies the migrations this binary holds that the store lacks. Postgres serialises
/// concurrent runs with an advisory lock; SQLite has none, so two processes starting on one
/// new file may both try the first migration, and the loser fails on the version's key
/// once the winner committed: a second run then finds it applied.
async fn migrate(pool: &AnyPool) -> Result<()> {
    let mut tries = 0;
    loop {
        match MIGRATIONS.run(pool).await {
            Ok(()) => return Ok(()),
            Err(e) if tries < 2 => {
                tries += 1;
                tracing::debug!("job store migration raced ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(100 * tries)).await;
            }
            Err(e) => return Err(e).context("migrating the job store schema"),
        }
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}
