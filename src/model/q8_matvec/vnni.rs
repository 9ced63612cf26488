//! The AVX-512 VNNI kernel over row panels.

use std::arch::x86_64::*;

use super::{Panels, Q8Vector, BLOCK, PANEL, STEPS};
use crate::model::disjoint::DisjointOut;

/// One panel's 16 rows times each of `xs`, written at `out[(first + j) * rows + row]`.
///
/// Per block and vector: eight `vpdpbusd` (a step's four weight bytes of all 16 rows, times
/// the vector's four values broadcast) give the 16 rows' exact integer dot products; the
/// offset of the unsigned weights is taken off, and the sum goes to f32, is scaled and
/// accumulated, one lane per row. Each block's weights are loaded once for the `N` vectors.
///
/// # Safety
/// The CPU has AVX-512F and AVX-512 VNNI; `panel` is one of `weights`' panels; `out` holds
/// `(first + N) * rows` values and no other thread writes those of this panel's rows.
#[target_feature(enable = "avx512f,avx512vnni")]
pub(super) unsafe fn panel_into<const N: usize>(
    weights: &Panels,
    (rows, cols): (usize, usize),
    xs: &[Q8Vector; N],
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
        for (x, acc) in xs.iter().zip(acc.iter_mut()) {
            let values = unsafe { x.quants.as_ptr().add(b * BLOCK) };
            let mut sum = _mm512_setzero_si512();
            for (s, &w) in w.iter().enumerate() {
                let four = unsafe { values.add(4 * s).cast::<i32>().read_unaligned() };
                sum = _mm512_dpbusd_epi32(sum, w, _mm512_set1_epi32(four));
            }
            let sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(128 * x.sums[b]));
            let d = _mm512_mul_ps(w_scales, _mm512_set1_ps(x.scales[b]));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d, *acc);
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
