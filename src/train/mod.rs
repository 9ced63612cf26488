//! Learning tags: jobs and their validation, examples, the three-stage training loop,
//! initialisations, evaluation, schedules and metrics.

pub mod checkpoint;
pub mod data;
mod evaluate;
mod examples;
mod forward;
pub mod init;
pub mod job;
pub mod metrics;
pub mod optim;
mod prefix_cache;
pub mod schedule;
pub mod trainer;

pub use checkpoint::Checkpoint;
pub use data::Dataset;
pub use init::mean_embedding_init;
pub use job::{HeadInit, HeadKind, Hyperparameters, TrainJob, RECORD_TEMPLATE_FIELD};
pub use trainer::{Hooks, Progress, SweepRun, Trained, Trainer};
