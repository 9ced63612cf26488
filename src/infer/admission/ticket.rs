//! The load an admitted request holds, released part by part as the engine finishes it.

use std::sync::{Arc, Mutex};

use super::{Load, State};

/// The load an admitted request holds; the engine releases its parts as they are done,
/// and the rest is released when the ticket is dropped (answered or abandoned).
#[derive(Debug)]
pub struct Ticket {
    pub(super) state: Arc<Mutex<State>>,
    pub(super) load: Load,
    /// The request's kind, whose typical load its measured one updates.
    pub(super) kind: String,
    /// Admitted on an estimate, not yet settled (counted in `preparing`).
    pub(super) preparing: bool,
}

impl Ticket {
    fn release(&mut self, part: Load) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(&part);
        self.load.head_tokens -= part.head_tokens;
        self.load.prompt_tokens -= part.prompt_tokens;
        self.load.generations -= part.generations;
    }

    /// Its head sequences were computed.
    pub fn heads_done(&mut self) {
        let part = Load {
            head_tokens: self.load.head_tokens,
            ..Load::default()
        };
        self.release(part);
    }

    /// A generation's prompt of `tokens` was prefilled.
    pub fn prompt_done(&mut self, tokens: u64) {
        let part = Load {
            prompt_tokens: tokens.min(self.load.prompt_tokens),
            ..Load::default()
        };
        self.release(part);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(&self.load);
        if self.preparing {
            s.preparing = s.preparing.saturating_sub(1);
        }
    }
}
