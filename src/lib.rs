//! tagllm: one frozen llama-family model, many task solvers made of learned tags
//! (Tag-LLM, ICML 2024). Layers point downwards: service (the assembly) -> http ->
//! jobs/infer/train -> tags -> model.

pub mod http;
pub mod infer;
pub mod jobs;
pub mod model;
pub mod service;
pub mod shutdown;
pub mod tags;
pub mod train;
