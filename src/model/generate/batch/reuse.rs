//! The prefix cache's side of a batch's prefill: queued prompts looked up once a slice can
//! reach them, and the common part of prompts queued together computed once.

use anyhow::Result;

use super::super::super::llama::Mode;
use super::super::super::BaseModel;
use super::super::Decoder;
use super::{DecodeBatch, MIN_CHUNK};

/// Prompts queued together whose first rows agree on at least this many have those rows
/// computed once, before their prefill; shorter common parts are not worth a forward.
const MIN_SHARED: usize = 4;

impl DecodeBatch {
    /// Looks up in the prefix cache the queued prompts that a slice of `left` tokens can
    /// reach from the front (taking what is found into each one's own cache), first
    /// computing once the common part of those among them that begin alike. Prompts
    /// further back wait: by the time they are reached, a prompt ahead of them that they
    /// share rows with may be done and in the cache. Returns the positions computed.
    pub(super) fn reuse_prefixes(&mut self, model: &BaseModel, left: usize) -> usize {
        let mut computed = 0;
        loop {
            match self.share_and_look_up(model, left.saturating_sub(computed)) {
                Ok(Some(n)) => computed += n,
                Ok(None) => return computed,
                Err(_) => {
                    // Those in reach prefill from scratch; their prefill reports any error.
                    for (_, d) in self.prefilling.iter_mut() {
                        d.reuse_checked = true;
                    }
                    return computed;
                }
            }
        }
    }

    /// One round of [`DecodeBatch::reuse_prefixes`]: `None` when no prompt in reach is left
    /// to look up, else the positions computed for a common part.
    fn share_and_look_up(&mut self, model: &BaseModel, left: usize) -> Result<Option<usize>> {
        let Some(prefixes) = self.prefixes.as_mut() else {
            return Ok(None);
        };
        // Positions a prompt may take from the cache: its last MIN_CHUNK are computed, so
        // that its first token's logits come from its own forward, off the quantized path.
        let reusable = |d: &Decoder| d.prompt_len().saturating_sub(MIN_CHUNK);
        // The unchecked prompts in reach, each counted with what the cache holds of it now.
        let (mut reach, mut unchecked) = (0, Vec::new());
        for (i, (_, d)) in self.prefilling.iter().enumerate() {
            let unlooked = d
                .rows
                .as_ref()
                .filter(|_| !d.reuse_checked && d.prefilled == 0);
            let rest = match unlooked {
                Some(rows) => d.prompt_len() - prefixes.cached_len(rows, reusable(d)),
                None => d.prompt_left(),
            };
            if i > 0 && reach + rest > left {
                break;
            }
            reach += rest;
            if unlooked.is_some() {
                unchecked.push(i);
            }
        }
        let Some((&first, others)) = unchecked.split_first() else {
            return Ok(None);
        };
        let lead = &self.prefilling[first].1;
        let Some(lead_rows) = lead.rows.as_ref() else {
            return Ok(None); // never: only prompts with rows are unchecked
        };
        let (mut group, mut shared) = (vec![first], reusable(lead).min(left));
        for &i in others {
            let d = &self.prefilling[i].1;
            let n = d.rows.as_ref().map_or(0, |r| r.common_prefix(lead_rows));
            let n = n.min(reusable(d));
            if n >= MIN_SHARED {
                group.push(i);
                shared = shared.min(n);
            }
        }
        let mut computed = 0;
        if group.len() > 1
            && shared >= MIN_SHARED
            && prefixes.cached_len(lead_rows, shared) < shared
        {
            let prompt = lead
                .prompt
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("a queued decoder without its prompt"))?;
            let mut cache = model.llama.new_cache();
            model.llama.forward(
                &prompt.narrow(1, 0, shared)?,
                None,
                Some(&mut cache),
                Mode::Fast,
            )?;
            prefixes.insert(lead_rows.prefix(shared), &cache);
            computed = shared;
        }
        // The group, and every other unchecked prompt in reach, take what the cache holds.
        for i in unchecked {
            let d = &mut self.prefilling[i].1;
            d.reuse_checked = true;
            let Some(rows) = d.rows.as_ref() else {
                continue;
            };
            if let Some((n, cache)) = prefixes.longest(rows, reusable(d))? {
                d.cache = cache;
                d.prefilled = n;
                self.reused += n as u64;
            }
        }
        Ok(Some(computed))
    }
}
