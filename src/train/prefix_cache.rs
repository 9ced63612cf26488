//! Keys/values of each example's frozen prefix, kept across a run: everything before the
//! first learned tag never changes, so after its first visit an example costs only the
//! part from the learned tag on. Kept within a memory budget; when the whole data set
//! would not fit in f32, entries are stored in f16 (half the bytes; keys and values
//! come back to f32 for use).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use candle_core::DType;

use crate::model::KvCache;

/// f16 holds magnitudes up to 65504; a cache with larger values stays in f32.
const F16_SAFE_MAX: f32 = 60_000.0;

pub struct PrefixCache {
    by_example: HashMap<usize, Arc<KvCache>>,
    bytes: usize,
    budget: usize,
    storage: DType,
}

impl PrefixCache {
    /// `full_f32_bytes`: what every example's prefix would take in f32.
    pub fn new(budget: usize, full_f32_bytes: usize) -> Self {
        let storage = if full_f32_bytes <= budget {
            DType::F32
        } else {
            DType::F16
        };
        Self {
            by_example: HashMap::new(),
            bytes: 0,
            budget,
            storage,
        }
    }

    pub fn get(&self, id: usize) -> Option<Arc<KvCache>> {
        self.by_example.get(&id).cloned()
    }

    pub fn storage(&self) -> DType {
        self.storage
    }

    /// Keeps `cache` for example `id` if the budget allows.
    pub fn offer(&mut self, id: usize, cache: &KvCache) -> Result<()> {
        let stored = if self.storage == DType::F32 || cache.max_abs()? > F16_SAFE_MAX {
            cache.clone()
        } else {
            cache.to_dtype(self.storage)?
        };
        if self.bytes + stored.bytes() <= self.budget {
            self.bytes += stored.bytes();
            self.by_example.insert(id, Arc::new(stored));
        }
        Ok(())
    }

    /// Examples cached and bytes held.
    pub fn usage(&self) -> (usize, usize) {
        (self.by_example.len(), self.bytes)
    }
}

/// The default budget: half the memory available now (1 GiB where that cannot be read).
pub fn default_budget() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map_or(1 << 30, |kib| kib * 1024 / 2)
}
