//! Durable training jobs: the store (SQLite or Postgres), the request/spec types, workers.

pub mod spec;
pub mod store;
pub mod submit;
pub mod worker;

pub use spec::{DatasetRef, JobSpec, TrainRequest};
pub use store::{CurvePoint, DatasetInfo, Job, JobState, JobStore};
pub use worker::{Worker, WorkerConfig};
