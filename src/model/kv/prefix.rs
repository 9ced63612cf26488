//! Keys and values of prompts prefilled before, reused by later prompts that begin with the
//! same input rows (a chat's system turn, a tag's template, the words of a shared
//! instruction): those positions are not computed again.
//!
//! Causal attention makes a position's keys and values a function of the input rows up to
//! it, so two prompts whose first `n` rows are bit for bit equal have the same first `n`
//! cached positions. Rows are compared as bits (never by a hash alone), so a reused prefix is
//! exactly the rows it was computed from. Entries are evicted least recently used first
//! within a byte budget.

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::cache::KvCache;

/// A prompt's input rows `[s, d]` as bits, for comparing with cached prompts.
#[derive(Debug, Clone)]
pub struct PromptRows {
    bits: Vec<u32>,
    width: usize,
}

impl PromptRows {
    pub fn of(prompt: &Tensor) -> Result<Self> {
        let (_, width) = prompt.dims2()?;
        let bits = prompt
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect();
        Ok(Self { bits, width })
    }

    /// Positions (rows).
    pub fn len(&self) -> usize {
        self.bits.len() / self.width.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// The number of leading rows equal in both.
    pub fn common_prefix(&self, other: &PromptRows) -> usize {
        if self.width != other.width {
            return 0;
        }
        self.bits
            .chunks_exact(self.width)
            .zip(other.bits.chunks_exact(self.width))
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// The first `n` rows.
    pub fn prefix(&self, n: usize) -> Self {
        Self {
            bits: self.bits[..n.min(self.len()) * self.width].to_vec(),
            width: self.width,
        }
    }

    fn bytes(&self) -> usize {
        self.bits.len() * 4
    }
}

struct Entry {
    rows: PromptRows,
    /// Single-sequence cache of exactly `rows.len()` positions, no padding.
    cache: KvCache,
    last_used: u64,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.rows.bytes() + self.cache.bytes()
    }
}

/// Prefilled prompts' keys and values, by their input rows, within a byte budget.
pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    bytes: usize,
    clock: u64,
}

impl PrefixCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget: budget_bytes,
            bytes: 0,
            clock: 0,
        }
    }

    /// Bytes held (cached keys and values, and the rows that name them).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry holding the longest prefix of `rows` (at most `max` positions), and its
    /// length.
    fn best(&self, rows: &PromptRows, max: usize) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, e.rows.common_prefix(rows).min(max)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(i, n)| (n, self.entries[i].last_used))
    }

    /// How many positions of `rows` (at most `max`) [`PrefixCache::longest`] would give:
    /// for planning, without taking them or refreshing the entry.
    pub fn cached_len(&self, rows: &PromptRows, max: usize) -> usize {
        self.best(rows, max).map_or(0, |(_, n)| n)
    }

    /// The longest cached prefix of `rows`, of at most `max` positions: its length and a
    /// single-sequence cache of those positions (views on the entry's tensors).
    pub fn longest(&mut self, rows: &PromptRows, max: usize) -> Result<Option<(usize, KvCache)>> {
        let Some((i, n)) = self.best(rows, max) else {
            return Ok(None);
        };
        self.clock += 1;
        let e = &mut self.entries[i];
        e.last_used = self.clock;
        Ok(Some((n, e.cache.prefix(n)?)))
    }

    /// Keeps `cache` (a single sequence, one position per row of `rows`) for later prompts.
    /// A prompt already covered by an entry only refreshes it; an entry the new one extends
    /// is replaced. Least recently used entries go when the budget is exceeded.
    pub fn insert(&mut self, rows: PromptRows, cache: &KvCache) {
        if rows.is_empty() || cache.len() != rows.len() || cache.sequences() != 1 {
            return;
        }
        self.clock += 1;
        let n = rows.len();
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.rows.len() >= n && e.rows.common_prefix(&rows) == n)
        {
            e.last_used = self.clock;
            return;
        }
        self.remove_where(|e| e.rows.len() < n && e.rows.common_prefix(&rows) == e.rows.len());
        let entry = Entry {
            rows,
            cache: cache.clone(),
            last_used: self.clock,
        };
        if entry.bytes() > self.budget {
            return;
        }
        self.bytes += entry.bytes();
        self.entries.push(entry);
        while self.bytes > self.budget {
            let Some(oldest) = self.entries.iter().map(|e| e.last_used).min() else {
                break;
            };
            self.remove_where(|e| e.last_used == oldest);
        }
    }

    fn remove_where(&mut self, gone: impl Fn(&Entry) -> bool) {
        let mut freed = 0;
        self.entries.retain(|e| {
            let drop = gone(e);
            if drop {
                freed += e.bytes();
            }
            !drop
        });
        self.bytes -= freed;
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn rows(values: &[f32]) -> PromptRows {
        let t = Tensor::from_vec(values.to_vec(), (values.len(), 1), &Device::Cpu).unwrap();
        PromptRows::of(&t).unwrap()
    }

    /// A single-sequence cache whose key at position `i` is `values[i]` (one layer, one
    /// head, width 1).
    fn cache(values: &[f32]) -> KvCache {
        let t = Tensor::from_vec(values.to_vec(), (1, 1, values.len(), 1), &Device::Cpu).unwrap();
        KvCache::from_single_sequence(vec![Some((t.clone(), t))])
    }

    fn keys(c: &KvCache) -> Vec<f32> {
        c.layers[0]
            .as_ref()
            .unwrap()
            .0
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn the_longest_equal_prefix_is_found_and_capped() {
        let mut p = PrefixCache::new(1 << 20);
        p.insert(rows(&[1., 2., 3., 4.]), &cache(&[10., 20., 30., 40.]));
        p.insert(rows(&[1., 5., 6.]), &cache(&[10., 50., 60.]));
        let (n, c) = p
            .longest(&rows(&[1., 2., 3., 9., 9.]), 10)
            .unwrap()
            .unwrap();
        assert_eq!((n, keys(&c)), (3, vec![10., 20., 30.]));
        assert_eq!(c.len(), 3);
        let (n, _) = p.longest(&rows(&[1., 2., 3., 4.]), 2).unwrap().unwrap();
        assert_eq!(n, 2, "capped at the positions asked for");
        assert!(p.longest(&rows(&[7., 1.]), 10).unwrap().is_none());
    }

    #[test]
    fn rows_are_compared_as_bits() {
        let mut p = PrefixCache::new(1 << 20);
        p.insert(rows(&[0.0, 1.]), &cache(&[1., 2.]));
        // -0.0 == 0.0 as floats, but not the same input row.
        assert!(p.longest(&rows(&[-0.0, 1.]), 10).unwrap().is_none());
    }

    #[test]
    fn covered_prompts_are_not_stored_twice_and_extensions_replace() {
        let mut p = PrefixCache::new(1 << 20);
        p.insert(rows(&[1., 2.]), &cache(&[1., 2.]));
        p.insert(rows(&[1., 2., 3.]), &cache(&[1., 2., 3.]));
        assert_eq!(p.len(), 1, "the longer entry replaced the one it extends");
        p.insert(rows(&[1., 2.]), &cache(&[1., 2.]));
        assert_eq!(p.len(), 1, "a covered prompt is not stored again");
        // A cache that does not match its rows is not kept.
        p.insert(rows(&[4., 5.]), &cache(&[4.]));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn the_least_recently_used_go_first_within_the_budget() {
        let one = {
            let mut p = PrefixCache::new(usize::MAX);
            p.insert(rows(&[1., 2.]), &cache(&[1., 2.]));
            p.bytes()
        };
        let mut p = PrefixCache::new(2 * one);
        p.insert(rows(&[1., 2.]), &cache(&[1., 2.]));
        p.insert(rows(&[3., 4.]), &cache(&[3., 4.]));
        p.longest(&rows(&[1., 2.]), 2).unwrap(); // [1, 2] used more recently than [3, 4]
        p.insert(rows(&[5., 6.]), &cache(&[5., 6.]));
        assert_eq!(p.len(), 2);
        assert!(p.bytes() <= 2 * one);
        assert!(p.longest(&rows(&[3., 4.]), 2).unwrap().is_none());
        assert!(p.longest(&rows(&[1., 2.]), 2).unwrap().is_some());
        // An entry larger than the whole budget is not kept.
        let mut tiny = PrefixCache::new(one - 1);
        tiny.insert(rows(&[1., 2.]), &cache(&[1., 2.]));
        assert!(tiny.is_empty());
    }
}
