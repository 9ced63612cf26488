//! A persistent, slot-based KV cache for decoding many sequences together.
//!
//! One tensor per layer holds every slot's keys (and one its values),
//! `[slots, kv_heads, capacity, head_dim]`. A decoding step writes each slot's new key and
//! value in place and attends to the filled part where it lies (through views on a GPU,
//! as slices on CPU: `attention`), so the batch is never
//! re-stacked or split between steps. Active sequences occupy the front slots (`0..len()`):
//! a leaving sequence's slot is refilled by the last one, so a step needs no gather.
//! Slots and capacity grow by doubling (one copy each time, amortised).

use anyhow::{bail, ensure, Result};
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor};

use super::cache::KvCache;
use crate::model::config::LlamaConfig;

/// The slot cache of one layer, `[slots, kv_heads, capacity, head_dim]` each.
pub(crate) struct CachedLayer<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub capacity: usize,
}

pub struct SlotKv {
    /// Per layer: keys and values, `[slots, kv_heads, capacity, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    /// Positions filled, per active slot.
    lens: Vec<usize>,
    slots: usize,
    capacity: usize,
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
}

/// Room for this many positions and sequences at first.
const INITIAL_CAPACITY: usize = 128;
const INITIAL_SLOTS: usize = 4;

impl SlotKv {
    pub fn new(cfg: &LlamaConfig, device: &Device) -> Self {
        Self {
            layers: Vec::new(),
            lens: Vec::new(),
            slots: 0,
            capacity: 0,
            num_layers: cfg.num_layers,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            device: device.clone(),
        }
    }

    /// Active sequences.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Positions filled, per active slot.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Bytes allocated for keys and values.
    pub fn bytes(&self) -> usize {
        self.num_layers * 2 * self.slots * self.kv_heads * self.capacity * self.head_dim * 4
    }

    /// Adds a sequence from its single-sequence cache (real positions only, as
    /// [`KvCache::split`] leaves them) into the next free slot; returns that slot.
    pub fn push(&mut self, cache: &KvCache) -> Result<usize> {
        let n = cache.len();
        ensure!(
            cache.key_valid.len() == 1 && cache.key_valid[0].iter().all(|v| *v),
            "a slot takes one sequence's cache without padding"
        );
        ensure!(
            cache.next_pos.first() == Some(&n),
            "a slot's positions must be 0..len"
        );
        ensure!(
            cache.layers.len() == self.num_layers,
            "cache has {} layers, the model {}",
            cache.layers.len(),
            self.num_layers
        );
        let slot = self.lens.len();
        self.reserve(slot + 1, n + 1)?;
        for (li, layer) in cache.layers.iter().enumerate() {
            let Some((k, v)) = layer else {
                ensure!(n == 0, "cache layer {li} is empty");
                continue;
            };
            let (dk, dv) = &self.layers[li];
            dk.narrow(0, slot, 1)?
                .slice_set(&k.to_dtype(DType::F32)?.contiguous()?, 2, 0)?;
            dv.narrow(0, slot, 1)?
                .slice_set(&v.to_dtype(DType::F32)?.contiguous()?, 2, 0)?;
        }
        self.lens.push(n);
        Ok(slot)
    }

    /// Frees `slot`; the last active sequence moves into it. Returns the slot that moved
    /// (`None` when `slot` was the last).
    pub fn swap_remove(&mut self, slot: usize) -> Result<Option<usize>> {
        ensure!(slot < self.lens.len(), "no active slot {slot}");
        let last = self.lens.len() - 1;
        if slot == last {
            self.lens.pop();
            return Ok(None);
        }
        let n = self.lens[last];
        for (k, v) in &self.layers {
            for t in [k, v] {
                // A copy first: slice_set cannot read the storage it writes.
                let moving = t.narrow(0, last, 1)?.narrow(2, 0, n)?.contiguous()?;
                t.narrow(0, slot, 1)?.slice_set(&moving, 2, 0)?;
            }
        }
        self.lens.swap_remove(slot);
        Ok(Some(last))
    }

    /// Drops every sequence and the memory.
    pub fn clear(&mut self) {
        self.layers.clear();
        self.lens.clear();
        self.slots = 0;
        self.capacity = 0;
    }

    /// Room for `slots` sequences of `capacity` positions, growing by doubling.
    pub(crate) fn reserve(&mut self, slots: usize, capacity: usize) -> Result<()> {
        if slots <= self.slots && capacity <= self.capacity {
            return Ok(());
        }
        let grow = |have: usize, want: usize, initial: usize| {
            let mut n = have.max(initial);
            while n < want {
                n *= 2;
            }
            n
        };
        let new_slots = grow(self.slots, slots, INITIAL_SLOTS);
        let new_capacity = grow(self.capacity, capacity, INITIAL_CAPACITY);
        let shape = (new_slots, self.kv_heads, new_capacity, self.head_dim);
        let mut layers = Vec::with_capacity(self.num_layers);
        for li in 0..self.num_layers {
            let k = Tensor::zeros(shape, DType::F32, &self.device)?;
            let v = Tensor::zeros(shape, DType::F32, &self.device)?;
            if let Some((ok, ov)) = self.layers.get(li) {
                // Old slots into the first rows, old positions into the first columns.
                for (new, old) in [(&k, ok), (&v, ov)] {
                    new.narrow(0, 0, self.slots)?.slice_set(old, 2, 0)?;
                }
            }
            layers.push((k, v));
        }
        self.layers = layers;
        self.slots = new_slots;
        self.capacity = new_capacity;
        Ok(())
    }

    /// Writes the new keys/values of every active slot, `[n, kv_heads, 1, head_dim]` each,
    /// at that slot's next position (call once per layer; [`SlotKv::advance`] after the
    /// last layer).
    pub(crate) fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (dk, dv) = &self.layers[layer];
        for (slot, &at) in self.lens.iter().enumerate() {
            dk.narrow(0, slot, 1)?
                .slice_set(&k.narrow(0, slot, 1)?.contiguous()?, 2, at)?;
            dv.narrow(0, slot, 1)?
                .slice_set(&v.narrow(0, slot, 1)?.contiguous()?, 2, at)?;
        }
        Ok(())
    }

    /// Like [`SlotKv::write`], from rows on the host: slot `i`'s new key is
    /// `rows[i * stride + keys_at..]` and its value `rows[i * stride + values_at..]`,
    /// `kv_heads * head_dim` values each (CPU only: written in place, with no tensor made).
    pub(crate) fn write_rows(
        &self,
        layer: usize,
        rows: &[f32],
        stride: usize,
        keys_at: usize,
        values_at: usize,
    ) -> Result<()> {
        let width = self.kv_heads * self.head_dim;
        ensure!(
            keys_at.max(values_at) + width <= stride && rows.len() >= self.lens.len() * stride,
            "write_rows: rows of {stride} values cannot hold a key and a value of {width}"
        );
        let (k, v) = &self.layers[layer];
        for (cache, from) in [(k, keys_at), (v, values_at)] {
            cache.inplace_op1(&WriteRows {
                kv: self,
                rows,
                stride,
                from,
            })?;
        }
        Ok(())
    }

    /// Views of layer `layer`'s keys and values over the active slots and the first `t`
    /// positions, `[n, kv_heads, t, head_dim]` (no copy).
    pub(crate) fn view(&self, layer: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = &self.layers[layer];
        let n = self.lens.len();
        Ok((
            k.narrow(0, 0, n)?.narrow(2, 0, t)?,
            v.narrow(0, 0, n)?.narrow(2, 0, t)?,
        ))
    }

    /// Layer `layer`'s keys and values as slices, for `f` (CPU only; the cache's tensors
    /// are whole, contiguous allocations).
    pub(crate) fn with_cpu_layer<R>(
        &self,
        layer: usize,
        f: impl FnOnce(&CachedLayer) -> R,
    ) -> Result<R> {
        let (k, v) = &self.layers[layer];
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let (Storage::Cpu(keys), Storage::Cpu(values)) = (&*k_storage, &*v_storage) else {
            bail!("the slot cache is not on the CPU");
        };
        ensure!(
            k_layout.is_contiguous() && v_layout.is_contiguous(),
            "the slot cache is not contiguous"
        );
        let (k_at, v_at) = (k_layout.start_offset(), v_layout.start_offset());
        Ok(f(&CachedLayer {
            keys: &keys.as_slice::<f32>()?[k_at..],
            values: &values.as_slice::<f32>()?[v_at..],
            capacity: self.capacity,
        }))
    }

    /// Every active slot has one more position.
    pub(crate) fn advance(&mut self) {
        for l in &mut self.lens {
            *l += 1;
        }
    }
}

/// The in-place write of [`SlotKv::write_rows`] into one cache tensor.
struct WriteRows<'a> {
    kv: &'a SlotKv,
    rows: &'a [f32],
    stride: usize,
    from: usize,
}

impl InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "slot-kv-write-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(cache) = storage else {
            candle_core::bail!("the slot cache is not f32");
        };
        if !layout.is_contiguous() {
            candle_core::bail!("the slot cache is not contiguous");
        }
        let cache = &mut cache[layout.start_offset()..];
        let (heads, hd, capacity) = (self.kv.kv_heads, self.kv.head_dim, self.kv.capacity);
        for (slot, &at) in self.kv.lens.iter().enumerate() {
            for h in 0..heads {
                let src = slot * self.stride + self.from + h * hd;
                let dst = ((slot * heads + h) * capacity + at) * hd;
                cache[dst..dst + hd].copy_from_slice(&self.rows[src..src + hd]);
            }
        }
        Ok(())
    }
}
