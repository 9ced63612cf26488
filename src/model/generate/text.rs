//! A generation's ids as text pieces, for streaming.

use anyhow::Result;

use super::super::BaseModel;
use super::GenerationParams;

/// Turns a generation's growing ids into text pieces as they become printable, for
/// streaming. Decoding re-reads only the last few ids (a window that starts at the previous
/// piece), so a stream costs O(n), and a character whose bytes span several tokens waits
/// for its last one (a partial character decodes to U+FFFD). With stop strings, the tail
/// that could still begin one is held back, so the pieces always add up to a prefix of the
/// final, cut text.
pub struct TextStream {
    prefix_offset: usize,
    read_offset: usize,
    text: String,
    sent: usize,
    hold_back: usize,
}

impl TextStream {
    pub fn new(params: &GenerationParams) -> Self {
        Self {
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            sent: 0,
            hold_back: params.stop.iter().map(String::len).max().unwrap_or(1) - 1,
        }
    }

    /// The text that became printable since the last call, if any.
    pub fn next(&mut self, model: &BaseModel, ids: &[u32]) -> Result<Option<String>> {
        let window = ids.get(self.prefix_offset..).unwrap_or_default();
        let seen = ids
            .get(self.prefix_offset..self.read_offset)
            .unwrap_or_default();
        let before = model.tokenizer.decode(seen, true)?;
        let now = model.tokenizer.decode(window, true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(new) = now.get(before.len()..) {
                self.text.push_str(new);
            }
            self.prefix_offset = self.read_offset;
            self.read_offset = ids.len();
        }
        let mut safe = self.text.len().saturating_sub(self.hold_back);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        Ok(self.take_to(safe))
    }

    /// What is left of the final text (the decoder's, cut at a stop string).
    pub fn finish(&mut self, final_text: &str) -> Option<String> {
        self.text = final_text.to_string();
        self.take_to(self.text.len())
    }

    fn take_to(&mut self, end: usize) -> Option<String> {
        let piece = self
            .text
            .get(self.sent..end)
            .filter(|p| !p.is_empty())?
            .to_string();
        self.sent = end;
        Some(piece)
    }
}
