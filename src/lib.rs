//! tagllm: one frozen llama-family model, many task solvers made of learned tags
//! (Tag-LLM, ICML 2024). Layers point downwards: service (the assembly) -> http ->
//! jobs/infer/train -> tags -> model.

// A client's request must never panic the server: no unwrap/expect outside tests (CI runs
// clippy with -D warnings).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod http;
pub mod infer;
pub mod jobs;
pub mod json_object;
pub mod model;
pub mod service;
pub mod shutdown;
pub mod tags;
pub mod train;
