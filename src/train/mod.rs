//! Learning tags: datasets, the three-stage training loop, schedules and metrics.

pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use checkpoint::Checkpoint;
pub use data::Dataset;
pub use trainer::{
    mean_embedding_init, HeadKind, Hooks, Hyperparameters, Progress, TrainJob, Trained, Trainer,
};
