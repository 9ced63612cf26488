//! Chat prompts: the model's chat template (a Jinja template in its metadata) rendered
//! around messages, as text or as pieces that keep each message's content apart.

use anyhow::{anyhow, bail, Context, Result};

use super::TextTokenizer;

/// A piece of a rendered chat prompt (see [`TextTokenizer::chat_pieces`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatPiece {
    /// The template's own text.
    Text(String),
    /// The content of message `i`.
    Message(usize),
}

impl TextTokenizer {
    /// Renders the model's chat template around one user message, ending with the
    /// assistant's turn, as `apply_chat_template(..., add_generation_prompt=True)` does.
    pub fn apply_chat_template(&self, user_message: &str) -> Result<String> {
        self.render_chat(&[("user", user_message)])
    }

    /// Renders the model's chat template around `messages` (role, content), ending with
    /// the assistant's turn.
    pub fn render_chat(&self, messages: &[(&str, &str)]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| anyhow!("this model has no chat template; use --raw"))?;
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template)
            .context("parsing the chat template")?;
        let token_str = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i))
                .unwrap_or_default()
        };
        let messages: Vec<_> = messages
            .iter()
            .map(|(role, content)| minijinja::context! { role => role, content => content })
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => token_str(self.bos_id),
            eos_token => token_str(self.eos_ids.first().copied()),
        };
        env.get_template("chat")?
            .render(ctx)
            .context("rendering the chat template")
    }

    /// The chat template rendered around `messages` as pieces: the template's own text
    /// (trusted: special-token strings in it are special tokens) and, where each message's
    /// content goes, its index. A client's content is then tokenised as plain text, so it
    /// can never forge a turn with `<|im_start|>`.
    pub fn chat_pieces(&self, messages: &[(&str, &str)]) -> Result<Vec<ChatPiece>> {
        // Private-use code points mark where each content lands.
        const OPEN: char = '\u{E000}';
        const CLOSE: char = '\u{E001}';
        let marks: Vec<String> = (0..messages.len())
            .map(|i| format!("{OPEN}{i}{CLOSE}"))
            .collect();
        let marked: Vec<(&str, &str)> = messages
            .iter()
            .zip(&marks)
            .map(|((role, _), mark)| (*role, mark.as_str()))
            .collect();
        let rendered = self.render_chat(&marked)?;
        let mut pieces = Vec::new();
        let mut placed = vec![false; messages.len()];
        let mut rest = rendered.as_str();
        while let Some(start) = rest.find(OPEN) {
            let after = &rest[start + OPEN.len_utf8()..];
            let index = after
                .find(CLOSE)
                .and_then(|end| after[..end].parse::<usize>().ok().map(|i| (i, end)))
                .filter(|(i, _)| *i < messages.len());
            let Some((i, end)) = index else {
                bail!("the chat template altered a message's place in the prompt");
            };
            if start > 0 {
                pieces.push(ChatPiece::Text(rest[..start].to_string()));
            }
            pieces.push(ChatPiece::Message(i));
            placed[i] = true;
            rest = &after[end + CLOSE.len_utf8()..];
        }
        if !rest.is_empty() {
            pieces.push(ChatPiece::Text(rest.to_string()));
        }
        if let Some(i) = placed.iter().position(|p| !p) {
            bail!(
                "the model's chat template leaves out message {i} ({} role)",
                messages[i].0
            );
        }
        Ok(pieces)
    }
}
