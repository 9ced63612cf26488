//! A training worker: claims jobs from the store, trains on its own thread, heartbeats,
//! checkpoints into the store, publishes the finished tag atomically, and resumes a job
//! whose previous worker vanished from that job's last checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::runtime::Handle;

use super::spec::JobSpec;
use super::store::{Claimed, Heartbeat, JobState, JobStore, ProgressReport};
use crate::model::BaseModel;
use crate::tags::Registry;
use crate::train::{Checkpoint, Dataset, Hooks, Progress, Trainer};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub id: String,
    /// A job whose worker has not heartbeaten for this long is taken over.
    pub lease: Duration,
    pub poll: Duration,
    pub heartbeat: Duration,
    /// Checkpoint into the store every this many steps.
    pub checkpoint_every: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: format!("{}-{}", hostname(), std::process::id()),
            lease: Duration::from_secs(60),
            poll: Duration::from_secs(1),
            heartbeat: Duration::from_secs(2),
            checkpoint_every: 25,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "worker".into())
}

pub struct Worker {
    pub store: JobStore,
    pub model: Arc<BaseModel>,
    pub registry: Arc<Registry>,
    pub config: WorkerConfig,
    pub runtime: Handle,
}

enum Outcome {
    Cancelled,
    Lost,
    /// The worker is shutting down: the job goes back to the queue.
    Stopped,
}

struct JobHooks<'a> {
    worker: &'a Worker,
    job_id: String,
    last_beat: Instant,
    outcome: Option<Outcome>,
    stop: &'a AtomicBool,
}

impl Hooks for JobHooks<'_> {
    fn progress(&mut self, p: &Progress) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            self.outcome = Some(Outcome::Stopped);
            return false;
        }
        // Evaluation steps always report: each is a point of the job's held-out curve.
        let due = self.last_beat.elapsed() >= self.worker.config.heartbeat
            || p.step == p.total_steps
            || p.eval_loss.is_some();
        if !due {
            return true;
        }
        self.last_beat = Instant::now();
        let report = ProgressReport {
            step: p.step as i64,
            loss: Some(p.loss),
            best_loss: p.best_eval_loss,
            eval: p.eval.clone(),
            eval_loss: p.eval_loss,
        };
        let w = self.worker;
        match w.runtime.block_on(w.store.heartbeat(
            &self.job_id,
            &w.config.id,
            w.config.lease,
            &report,
        )) {
            Ok(Heartbeat::Continue) => true,
            Ok(Heartbeat::Cancel) => {
                self.outcome = Some(Outcome::Cancelled);
                false
            }
            Ok(Heartbeat::Lost) => {
                self.outcome = Some(Outcome::Lost);
                false
            }
            // A passing database error: keep training; the next beat may get through.
            Err(e) => {
                tracing::warn!(job = %self.job_id, error = %format!("{e:#}"), "heartbeat failed");
                true
            }
        }
    }

    fn every(&self) -> usize {
        self.worker.config.checkpoint_every
    }

    fn checkpoint(&mut self, c: &Checkpoint) -> Result<()> {
        let w = self.worker;
        let kept = w.runtime.block_on(w.store.save_checkpoint(
            &self.job_id,
            &w.config.id,
            c.step as i64,
            c.to_bytes()?,
        ))?;
        if !kept {
            self.outcome = Some(Outcome::Lost);
            anyhow::bail!("lost the lease on job {}", self.job_id);
        }
        Ok(())
    }
}

/// Claims of one job after which it is failed instead of run again.
const MAX_ATTEMPTS: i64 = 3;

impl Worker {
    /// Claims and runs jobs until `stop` is set.
    pub fn run(&self, stop: Arc<AtomicBool>) {
        tracing::info!(worker = %self.config.id, "training worker started");
        while !stop.load(Ordering::Relaxed) {
            match self.run_one(&stop) {
                Ok(true) => {}
                Ok(false) => std::thread::sleep(self.config.poll),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "worker error");
                    std::thread::sleep(self.config.poll);
                }
            }
        }
    }

    /// Claims one job and runs it to its end. Returns false when there was none. `stop`
    /// set meanwhile hands the job back to the queue (it resumes from its last checkpoint
    /// wherever it is claimed next).
    pub fn run_one(&self, stop: &AtomicBool) -> Result<bool> {
        let Some(claimed) = self
            .runtime
            .block_on(self.store.claim(&self.config.id, self.config.lease))?
        else {
            return Ok(false);
        };
        let id = claimed.job.id.clone();
        tracing::info!(job = %id, tag = %claimed.job.tag, attempt = claimed.job.attempts, resume_from = claimed.job.resumed_from_step, "job claimed");
        let me = &self.config.id;
        let mut hooks = JobHooks {
            worker: self,
            job_id: id.clone(),
            last_beat: Instant::now(),
            outcome: None,
            stop,
        };
        let result = if claimed.job.attempts > MAX_ATTEMPTS {
            // Every earlier attempt ended with its worker gone (killed, out of memory):
            // failing the job keeps it from taking each new worker down with it.
            Err(anyhow::anyhow!(
                "gave up after {MAX_ATTEMPTS} attempts: the worker running it stopped each time"
            ))
        } else {
            // A panic fails this job (with its message), never the worker thread.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.train(claimed, &mut hooks)
            }))
            .unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(anyhow::anyhow!("training panicked: {why}"))
            })
        };
        match (result, hooks.outcome) {
            (_, Some(Outcome::Lost)) => {
                tracing::warn!(job = %id, "lease lost; another worker owns the job now")
            }
            (_, Some(Outcome::Stopped)) => {
                self.runtime.block_on(self.store.release(&id, me))?;
                tracing::info!(job = %id, "worker stopping: job handed back to the queue");
            }
            (_, Some(Outcome::Cancelled)) => {
                self.runtime.block_on(self.store.finish(
                    &id,
                    me,
                    JobState::Cancelled,
                    None,
                    None,
                    None,
                ))?;
                tracing::info!(job = %id, "job cancelled");
            }
            (Ok((version, eval)), _) => {
                self.runtime.block_on(self.store.finish(
                    &id,
                    me,
                    JobState::Succeeded,
                    None,
                    Some(version),
                    Some(&eval),
                ))?;
                tracing::info!(job = %id, version, "job succeeded; tag published");
            }
            (Err(e), _) => {
                let msg = format!("{e:#}");
                self.runtime.block_on(self.store.finish(
                    &id,
                    me,
                    JobState::Failed,
                    Some(&msg),
                    None,
                    None,
                ))?;
                tracing::warn!(job = %id, error = %msg, "job failed");
            }
        }
        Ok(true)
    }

    /// Trains, publishes, and returns the published version and the final evaluation.
    fn train(&self, claimed: Claimed, hooks: &mut JobHooks) -> Result<(i64, serde_json::Value)> {
        let spec: JobSpec = serde_json::from_value(claimed.spec).context("malformed job spec")?;
        let load = |id: &str| -> Result<Dataset> {
            let text = self
                .runtime
                .block_on(self.store.dataset_content(id))?
                .with_context(|| format!("dataset {id} is gone"))?;
            Dataset::from_jsonl(&text)
        };
        let data = load(&spec.dataset)?;
        let eval = spec.eval_dataset.as_deref().map(load).transpose()?;
        // Tags published since the server started (e.g. by an earlier stage) count.
        self.registry.rescan();
        let frozen = Arc::new(self.registry.snapshot().clone_tags());
        let trainer = Trainer::new(&self.model, frozen, spec.job, &data, eval.as_ref())?;
        let resume = claimed
            .checkpoint
            .as_deref()
            .map(|b| Checkpoint::from_bytes(b, self.model.device()))
            .transpose()?;
        let trained = trainer.run(resume, hooks)?;
        // Publish: each bundle is written atomically (tensors, then the manifest that
        // carries their sha256); a re-run after a crash here rewrites the same version.
        let mut version = 0;
        for b in &trained.bundles {
            version = b.save(self.registry.dir())? as i64;
        }
        self.registry.rescan();
        Ok((version, trained.eval))
    }
}
