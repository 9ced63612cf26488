//! An output buffer that a pool's threads fill at disjoint places.
//!
//! candle's `barrier_pool().execute_chunked` hands each thread ranges of work items by
//! reference (`Fn + Sync`), so the items cannot hold `&mut` parts of one output; the
//! kernels that write there (`q8_matvec`, `kv::attention`) give each item its own
//! elements instead and write through this pointer.

#[derive(Clone, Copy)]
pub(crate) struct DisjointOut(*mut f32);

// SAFETY: the pointer is only written through `write` / `at`, whose callers vouch that no
// two threads touch one element, and the buffer outlives the pool's call.
unsafe impl Send for DisjointOut {}
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// # Safety
    /// `at` is inside the output and no other thread touches it.
    pub(crate) unsafe fn write(self, at: usize, value: f32) {
        unsafe { *self.0.add(at) = value }
    }

    /// A pointer to element `at`.
    ///
    /// # Safety
    /// `at` is inside the output.
    pub(crate) unsafe fn at(self, at: usize) -> *mut f32 {
        unsafe { self.0.add(at) }
    }
}
