//! What the engine is given and answers: its configuration, the groups of sequences a
//! request brings, and the reply. Shared by the engine's handle, its scheduler and its
//! executor, which all import it from here (none from another).

use std::time::Duration;

use tokio::sync::mpsc;

use super::admission::Refused;
use super::heads::Prediction;
use crate::model::Precision;
use crate::tags::compose::Composed;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Padded tokens (batch x longest sequence) per forward pass.
    pub max_batch_tokens: usize,
    /// A shared prefix at least this long is computed once for several functions.
    pub min_shared_prefix: usize,
    /// Admission: the longest estimated wait a new head request may face before it is
    /// answered; more answers 429 at once. Work not started after twice this fails with 503.
    pub max_queue_wait: Duration,
    /// Admission: the longest estimated wait for a new generation's first token (its slot,
    /// and the prompts ahead of it); more answers 429 at once. Longer than a head
    /// request's: prefilling 64 chat prompts takes seconds on two cores, and a generation
    /// that streams its answer for seconds anyway is better served late than refused.
    pub max_first_token_wait: Duration,
    /// How the engine's forward reads the frozen matrices (training keeps f32); `auto`:
    /// q8_0 on CPU, f32 on a GPU.
    pub precision: Precision,
    /// Generations decoding together at most (the decoding batch's slots); more wait for
    /// a slot, within the queue budget, or are refused.
    pub max_generations: usize,
    /// Bytes the decoding batch's keys and values may take: bounds how many long
    /// generations decode together.
    pub kv_cache_bytes: usize,
    /// Bytes of prefilled prompts' keys and values kept so that later generation prompts
    /// beginning with the same rows (a chat's system turn, a tag's template) skip them;
    /// 0 keeps none.
    pub prefix_cache_bytes: usize,
    /// The time one slice of generation prompts' prefill aims at, between two decoding
    /// steps (its tokens follow the measured pace): what a head request waits at most
    /// behind someone else's prompt.
    pub prefill_slice: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 4096,
            min_shared_prefix: 8,
            max_queue_wait: Duration::from_millis(1500),
            max_first_token_wait: Duration::from_secs(10),
            precision: Precision::Auto,
            max_generations: 64,
            kv_cache_bytes: 2 << 30,
            prefix_cache_bytes: 256 << 20,
            prefill_slice: Duration::from_millis(400),
        }
    }
}

/// Several sequences that belong together: one input under one or more functions. When
/// there are several, their common prefix is computed once.
#[derive(Debug, Clone)]
pub struct Group {
    pub seqs: Vec<Composed>,
}

#[derive(Debug)]
pub struct Timings {
    pub queue: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// Not admitted: the queue already holds more work than its wait budget.
    #[error("{0}")]
    Overloaded(Refused),
    /// Admitted, but not started before its deadline (the pace dropped).
    #[error("waited {:.1} s in the queue without being started; retry later", .0.as_secs_f64())]
    Expired(Duration),
    #[error("{0}")]
    Failed(String),
}

pub type Reply = Result<(Vec<Vec<Prediction>>, Timings), EngineError>;

/// Text pieces of a streamed generation, as they become printable.
pub type TextPieces = mpsc::UnboundedSender<String>;
