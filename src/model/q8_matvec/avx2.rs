//! The AVX2 kernel over row groups: candle's q8_0 × q8_0 arithmetic, block for block.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Group, Q8Vector, BLOCK, GROUP};
use crate::model::disjoint::DisjointOut;

/// Per block: |w| · sign(x, w) in u8 × i8 pairs, summed to eight i32 lanes, to f32, then
/// scaled and accumulated; the eight lanes are summed at the end (candle's order). Each
/// group's weights are loaded once for the `N` vectors.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `out` holds `(first + N) * rows` values and no other
/// thread writes those of these groups' rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn groups_into<const N: usize>(
    weights: &[Group],
    (rows, cols): (usize, usize),
    xs: [&Q8Vector; N],
    groups: Range<usize>,
    out: DisjointOut,
    first: usize,
) {
    let blocks = cols / BLOCK;
    let ones = _mm256_set1_epi16(1);
    let block_sum = |w: __m256i, v: __m256i| {
        let products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, products))
    };
    for g in groups {
        let mut acc = [[_mm256_setzero_ps(); GROUP]; N];
        for (group, b) in weights[g * blocks..][..blocks].iter().zip(0..) {
            let w_scales = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(group.scales.as_ptr().cast()) });
            let w: [__m256i; GROUP] = std::array::from_fn(|r| unsafe {
                _mm256_loadu_si256(group.quants[r].as_ptr().cast())
            });
            for (x, acc) in xs.iter().zip(acc.iter_mut()) {
                // SAFETY: block b of the vector is in bounds.
                let v = unsafe { _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK).cast()) };
                let mut d = [0f32; GROUP];
                let scales = _mm_mul_ps(w_scales, _mm_set1_ps(x.scales[b]));
                unsafe { _mm_storeu_ps(d.as_mut_ptr(), scales) };
                for r in 0..GROUP {
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d[r]), block_sum(w[r], v), acc[r]);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (r, &acc) in acc.iter().enumerate() {
                let row = g * GROUP + r;
                if row < rows {
                    unsafe { out.write((first + j) * rows + row, hsum(acc)) };
                }
            }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
fn hsum(x: __m256) -> f32 {
    let halves = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
}
