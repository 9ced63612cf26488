//! Learning tags: jobs and their validation, examples, the three-stage training loop,
//! initialisations, evaluation, schedules and metrics.

mod batches;
pub mod checkpoint;
pub mod data;
mod evaluate;
mod examples;
mod forward;
mod head;
mod head_fit;
pub mod hyperparameters;
pub mod init;
pub mod job;
pub mod metrics;
pub mod optim;
mod prefix_cache;
mod publish;
pub mod schedule;
mod sweep;
pub mod trainer;

pub use checkpoint::Checkpoint;
pub use data::Dataset;
pub use hyperparameters::{HeadInit, Hyperparameters};
pub use init::mean_embedding_init;
pub use job::{HeadKind, TrainJob, RECORD_TEMPLATE_FIELD};
pub use sweep::SweepRun;
pub use trainer::{Hooks, Progress, Trained, Trainer};
