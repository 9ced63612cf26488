//! The cache of a padded batch's keys and values (`[batch, kv_heads, positions, head_dim]`
//! per layer, with each position's padding flag): what `Llama::forward` extends, and what
//! training keeps of a frozen prefix (split per example, stacked again per batch).

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

use crate::model::config::LlamaConfig;

/// Keys and values of everything seen so far, per layer, for incremental decoding (or for
/// reusing a frozen prefix while training).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per sequence, per cached position: was it a real token (not padding)?
    pub(crate) key_valid: Vec<Vec<bool>>,
    /// Per sequence: the position id the next real token gets.
    pub(crate) next_pos: Vec<usize>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            key_valid: Vec::new(),
            next_pos: Vec::new(),
        }
    }

    /// A single sequence's cache of `layers` (`[1, kv_heads, n, head_dim]` each), every
    /// position real (tests build caches by hand with it).
    #[cfg(test)]
    pub(crate) fn from_single_sequence(layers: Vec<Option<(Tensor, Tensor)>>) -> Self {
        let n = layers
            .iter()
            .flatten()
            .next()
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
        Self {
            layers,
            key_valid: vec![vec![true; n]],
            next_pos: vec![n],
        }
    }

    /// A cache of one sequence that holds nothing yet (what [`KvCache::stack`] takes for a
    /// sequence starting from scratch).
    pub fn empty_sequence(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            key_valid: vec![Vec::new()],
            next_pos: vec![0],
        }
    }

    /// Sequences held.
    pub fn sequences(&self) -> usize {
        self.key_valid.len()
    }

    /// The first `n` positions of a single-sequence cache without padding (views).
    pub fn prefix(&self, n: usize) -> Result<Self> {
        ensure!(
            self.key_valid.len() == 1 && self.key_valid[0].iter().all(|&v| v),
            "only a single unpadded sequence's cache has prefixes"
        );
        ensure!(
            n <= self.len(),
            "prefix of {n} positions of a cache of {}",
            self.len()
        );
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?))),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            key_valid: vec![vec![true; n]],
            next_pos: vec![n],
        })
    }

    /// Number of cached positions (padding included).
    pub fn len(&self) -> usize {
        self.key_valid.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache without gradient history, e.g. a frozen prefix reused in training.
    pub fn detach(&self) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.as_ref().map(|(k, v)| (k.detach(), v.detach())))
                .collect(),
            key_valid: self.key_valid.clone(),
            next_pos: self.next_pos.clone(),
        }
    }

    /// The cache of one sequence repeated `n` times, so `n` continuations share a prefix.
    pub fn repeat(&self, n: usize) -> Result<Self> {
        ensure!(
            self.key_valid.len() == 1,
            "only a single-sequence cache can be repeated"
        );
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?))),
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            key_valid: vec![self.key_valid[0].clone(); n],
            next_pos: vec![self.next_pos[0]; n],
        })
    }

    /// One single-sequence cache per sequence of this batch cache, each reduced to its
    /// real (non-padding) positions: to keep per-example prefixes, or per-generation
    /// caches, and batch them again later with [`KvCache::stack`].
    pub fn split(&self) -> Result<Vec<KvCache>> {
        (0..self.key_valid.len())
            .map(|b| {
                let keep: Vec<u32> = self.key_valid[b]
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v)
                    .map(|(i, _)| i as u32)
                    .collect();
                let n = keep.len();
                // Right padding keeps a prefix (a cheap narrow); anything else is gathered.
                let prefix = keep.iter().enumerate().all(|(j, &i)| j as u32 == i);
                let keep = Tensor::from_vec(
                    keep,
                    n,
                    self.layers
                        .iter()
                        .flatten()
                        .next()
                        .map_or(&Device::Cpu, |(k, _)| k.device()),
                )?;
                let take = |t: &Tensor| -> Result<Tensor> {
                    let row = t.narrow(0, b, 1)?;
                    Ok(if prefix {
                        row.narrow(2, 0, n)?.contiguous()?
                    } else {
                        row.index_select(&keep, 2)?
                    })
                };
                let layers = self
                    .layers
                    .iter()
                    .map(|l| match l {
                        Some((k, v)) => Ok(Some((take(k)?, take(v)?))),
                        None => Ok(None),
                    })
                    .collect::<Result<_>>()?;
                Ok(KvCache {
                    layers,
                    key_valid: vec![vec![true; n]],
                    next_pos: vec![self.next_pos[b]],
                })
            })
            .collect()
    }

    /// Stacks single-sequence caches into one batch cache; shorter ones are right-padded
    /// with masked positions.
    pub fn stack(caches: &[&KvCache], cfg: &LlamaConfig, device: &Device) -> Result<KvCache> {
        ensure!(
            caches.iter().all(|c| c.key_valid.len() == 1),
            "stack takes single-sequence caches"
        );
        let longest = caches.iter().map(|c| c.len()).max().unwrap_or(0);
        let empty = Tensor::zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), DType::F32, device)?;
        let pad = |t: &Tensor| -> Result<Tensor> {
            let t = &t.to_dtype(DType::F32)?; // a no-op unless stored in half precision
            let n = t.dim(2)?;
            if n == longest {
                return Ok(t.clone());
            }
            if n == 0 {
                // Nothing cached yet for this sequence: all padding.
                return Ok(Tensor::zeros(
                    (1, cfg.num_kv_heads, longest, cfg.head_dim),
                    DType::F32,
                    t.device(),
                )?);
            }
            let z = Tensor::zeros(
                (1, cfg.num_kv_heads, longest - n, cfg.head_dim),
                t.dtype(),
                t.device(),
            )?;
            Ok(Tensor::cat(&[t, &z], 2)?)
        };
        let layers = (0..cfg.num_layers)
            .map(|li| {
                let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = caches
                    .iter()
                    .map(|c| match &c.layers[li] {
                        Some((k, v)) => Ok((pad(k)?, pad(v)?)),
                        None => Ok((pad(&empty)?, pad(&empty)?)),
                    })
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .unzip();
                Ok(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)))
            })
            .collect::<Result<_>>()?;
        let key_valid = caches.iter().map(|c| {
            let mut v = c.key_valid[0].clone();
            v.resize(longest, false);
            v
        });
        Ok(KvCache {
            layers,
            key_valid: key_valid.collect(),
            next_pos: caches.iter().map(|c| c.next_pos[0]).collect(),
        })
    }

    /// The cache with keys and values stored as `dtype` (e.g. f16 to hold twice as many
    /// frozen prefixes in the same memory; [`KvCache::stack`] brings them back to f32).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|l| match l {
                    Some((k, v)) => Ok(Some((k.to_dtype(dtype)?, v.to_dtype(dtype)?))),
                    None => Ok(None),
                })
                .collect::<Result<_>>()?,
            key_valid: self.key_valid.clone(),
            next_pos: self.next_pos.clone(),
        })
    }

    /// The largest magnitude among the cached keys and values.
    pub fn max_abs(&self) -> Result<f32> {
        let mut top = 0f32;
        for (k, v) in self.layers.iter().flatten() {
            for t in [k, v] {
                top = top.max(
                    t.abs()?
                        .max_all()?
                        .to_dtype(DType::F32)?
                        .to_scalar::<f32>()?,
                );
            }
        }
        Ok(top)
    }

    /// Bytes held by the cached keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}
