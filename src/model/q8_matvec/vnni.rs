//! The AVX-512 VNNI kernel over row panels.

use std::arch::x86_64::*;

use super::{Panels, Q8Vector, BLOCK, PANEL, STEPS};
use crate::model::disjoint::DisjointOut;

/// One panel's 16 rows times each of `xs`, written at `out[j * rows + row]`, a few
/// vectors at a time (`for_each_pass`).
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 VNNI; `panel` is one of `weights`' panels; `out` holds
/// `xs.len() * rows` values and no other thread writes those of this panel's rows.
#[target_feature(enable = "avx512f,avx512vnni")]
pub(super) unsafe fn panel_into(
    weights: &Panels,
    shape: (usize, usize),
    xs: &[Q8Vector],
    panel: usize,
    out: DisjointOut,
) {
    for_each_pass!(xs, |pass, first| {
        // SAFETY: as this function's; the pass's vectors are in `out` from `first` on.
        unsafe { pass_into(pass, weights, shape, panel, out, first) }
    });
}

/// The panel's 16 rows times `N` vectors, written at `out[(first + j) * rows + row]`.
///
/// Per block and vector: eight `vpdpbusd` (a step's four weight bytes of all 16 rows, times
/// the vector's four values broadcast), starting from minus the offset of the unsigned
/// weights, give the 16 rows' exact integer dot products; the sum goes to f32, is scaled
/// and accumulated, one lane per row. Each block's weights are loaded once for the `N` vectors.
///
/// # Safety
/// As [`panel_into`]'s, with `(first + N) * rows` values in `out`.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
unsafe fn pass_into<const N: usize>(
    xs: [&Q8Vector; N],
    weights: &Panels,
    (rows, cols): (usize, usize),
    panel: usize,
    out: DisjointOut,
    first: usize,
) {
    let blocks = cols / BLOCK;
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..blocks {
        let at = panel * blocks + b;
        // SAFETY (all loads): `at` is a block of this panel, inside both arrays; block b
        // of each vector is in bounds.
        let quants = unsafe { weights.quants.as_ptr().add(at * STEPS * 64) };
        let w: [__m512i; STEPS] =
            std::array::from_fn(|s| unsafe { _mm512_loadu_si512(quants.add(s * 64).cast()) });
        let w_scales = unsafe { _mm512_loadu_ps(weights.scales.as_ptr().add(at * PANEL)) };
        if first == 0 {
            // The next panel's block b, while this one computes: a decoding step streams
            // the weights from memory once, and the first pass over a panel waited for it.
            // (A prefetch never faults, so past the last panel is harmless.)
            let next = quants.wrapping_add(blocks * STEPS * 64);
            for s in 0..STEPS {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(s * 64).cast());
            }
            let next_scales = weights.scales.as_ptr().wrapping_add((at + blocks) * PANEL);
            _mm_prefetch::<_MM_HINT_T0>(next_scales.cast());
        }
        for (x, acc) in xs.iter().zip(acc.iter_mut()) {
            let values = unsafe { x.quants.as_ptr().add(b * BLOCK) };
            let word = |s: usize| {
                _mm512_set1_epi32(unsafe { values.add(4 * s).cast::<i32>().read_unaligned() })
            };
            // Two chains of four (a `vpdpbusd` waits ~5 cycles for the one before it in its
            // chain; one chain of eight made 16 vectors 2.5x slower, and four chains gained
            // nothing, even for one vector). The first starts from the offset that the
            // unsigned weights add.
            let mut even = _mm512_set1_epi32(unsafe { *x.offsets.as_ptr().add(b) });
            let mut odd = _mm512_setzero_si512();
            for s in (0..STEPS).step_by(2) {
                even = _mm512_dpbusd_epi32(even, w[s], word(s));
                odd = _mm512_dpbusd_epi32(odd, w[s + 1], word(s + 1));
            }
            let sum = _mm512_add_epi32(even, odd);
            let x_scale = _mm512_set1_ps(unsafe { *x.scales.as_ptr().add(b) });
            *acc = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(sum),
                _mm512_mul_ps(w_scales, x_scale),
                *acc,
            );
        }
    }
    let valid = (rows - panel * PANEL).min(PANEL);
    let mask = (u32::MAX >> (32 - valid)) as u16;
    for (j, acc) in acc.iter().enumerate() {
        // SAFETY: the panel's first row is inside the output row; the mask stores only
        // the panel's rows that exist.
        unsafe { _mm512_mask_storeu_ps(out.at((first + j) * rows + panel * PANEL), mask, *acc) };
    }
}
