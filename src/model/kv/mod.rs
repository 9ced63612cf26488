//! Keys and values kept between forwards, and decoding over them.
//!
//! - `cache`: a padded batch's cache, as `Llama::forward` extends it (prefill, training's
//!   frozen prefixes);
//! - `slots`: the serving engine's persistent per-generation slots, written in place;
//! - `attention`: one decoding step's attention over the slots, on host slices;
//! - `host_step`: a whole decoding step on host slices from q8_0 weights;
//! - `prefix`: prompts' keys and values kept to be reused by prompts that begin alike.
//!
//! Depends on the weights and config only; `Llama` uses it, never the other way.

pub(crate) mod attention;
mod cache;
pub(crate) mod host_step;
mod prefix;
mod slots;

pub use cache::KvCache;
pub use prefix::{PrefixCache, PromptRows};
pub use slots::SlotKv;
