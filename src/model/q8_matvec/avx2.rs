//! The AVX2 kernel over row panels: the VNNI kernel's arithmetic without `vpdpbusd`.

use std::arch::x86_64::*;

use super::{Panels, Q8Vector, BLOCK, PANEL, STEPS};
use crate::model::disjoint::DisjointOut;

/// Rows of a half panel: one 256-bit lane of i32 per row.
const HALF: usize = PANEL / 2;

/// One panel's 16 rows times each of `xs`, written at `out[j * rows + row]`, in two halves
/// of eight rows.
///
/// Per block, step and vector: the step's four weight bytes of eight rows (stored plus
/// 128; `xor` 0x80 gives them back signed), multiplied by the vector's four values
/// broadcast. `vpmaddubsw` takes unsigned bytes times signed ones, so it gets |w| and the
/// values with w's sign (as candle's AVX2 q8_0 kernel does), and `vpmaddwd` sums pairs to
/// i32. The block's integer sums are exact, then go to f32, are scaled and accumulated
/// exactly as in `panel_row_dot` (and the VNNI kernel), which a unit test holds this to
/// bit for bit. A half panel's weights, once loaded, serve a pass of up to four vectors
/// (`for_each_pass`), and stay in L1 for the next.
///
/// # Safety
/// The CPU has AVX2 and FMA; `panel` is one of `weights`' panels; `out` holds
/// `xs.len() * rows` values and no other thread writes those of this panel's rows.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panel_into(
    weights: &Panels,
    shape: (usize, usize),
    xs: &[Q8Vector],
    panel: usize,
    out: DisjointOut,
) {
    for half in 0..2 {
        for_each_pass!(xs, |pass, first| {
            // SAFETY: as this function's; the pass's vectors are in `out` from `first` on.
            unsafe { half_into(pass, weights, shape, panel, half, out, first) }
        });
    }
}

/// Rows `half * 8..half * 8 + 8` of the panel times `N` vectors, written at
/// `out[(first + j) * rows + row]`.
///
/// # Safety
/// As [`panel_into`]'s, with `(first + N) * rows` values in `out`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn half_into<const N: usize>(
    xs: [&Q8Vector; N],
    weights: &Panels,
    (rows, cols): (usize, usize),
    panel: usize,
    half: usize,
    out: DisjointOut,
    first: usize,
) {
    let blocks = cols / BLOCK;
    let (ones, flip) = (_mm256_set1_epi16(1), _mm256_set1_epi8(-128));
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..blocks {
        let at = panel * blocks + b;
        // SAFETY (all loads): `at` is a block of this panel, inside both arrays; block b
        // of each vector is in bounds.
        let quants = unsafe { weights.quants.as_ptr().add(at * STEPS * 64 + half * 32) };
        let mut sums = [_mm256_setzero_si256(); N];
        for s in 0..STEPS {
            let w = unsafe { _mm256_loadu_si256(quants.add(s * 64).cast()) };
            let w = _mm256_xor_si256(w, flip);
            let magnitude = _mm256_abs_epi8(w);
            for (x, sum) in xs.iter().zip(sums.iter_mut()) {
                let word = unsafe { x.quants.as_ptr().add(b * BLOCK + 4 * s) };
                let v = _mm256_set1_epi32(unsafe { word.cast::<i32>().read_unaligned() });
                let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(v, w));
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
            }
        }
        let w_scales =
            unsafe { _mm256_loadu_ps(weights.scales.as_ptr().add(at * PANEL + half * HALF)) };
        for ((x, sum), acc) in xs.iter().zip(sums).zip(acc.iter_mut()) {
            let x_scale = _mm256_set1_ps(unsafe { *x.scales.as_ptr().add(b) });
            *acc = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(sum),
                _mm256_mul_ps(w_scales, x_scale),
                *acc,
            );
        }
    }
    let start = panel * PANEL + half * HALF;
    let valid = rows.saturating_sub(start).min(HALF);
    for (j, acc) in acc.iter().enumerate() {
        let mut lanes = [0f32; HALF];
        // SAFETY: `lanes` holds eight values.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *acc) };
        for (r, &v) in lanes[..valid].iter().enumerate() {
            // SAFETY: the row exists; the caller vouches for `out`.
            unsafe { out.write((first + j) * rows + start + r, v) };
        }
    }
}
