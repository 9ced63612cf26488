//! tagllm: one frozen llama-family model, many task solvers made of learned tags
//! (Tag-LLM, ICML 2024). Layers point downwards: http -> jobs/infer/train -> tags -> model.

pub mod model;
