//! Learning tags: datasets, the three-stage training loop, schedules and metrics.

pub mod data;
pub mod metrics;
pub mod schedule;
pub mod trainer;

pub use data::Dataset;
pub use trainer::{
    mean_embedding_init, HeadKind, Hyperparameters, Progress, TrainJob, Trained, Trainer,
};
