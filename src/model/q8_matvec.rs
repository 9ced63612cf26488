//! A frozen matrix in q8_0 times a few vectors: the quantized path of decoding steps.
//!
//! The arithmetic is candle's AVX2 q8_0 × q8_0 dot product, block for block: results are
//! bit-identical to its `QMatMul` wherever that kernel serves (a unit test holds them to
//! it), so the drift measured for q8_0 holds too, and a sequence's result does not depend
//! on what it is batched with. What differs is the layout and the loop:
//! - four rows' blocks lie side by side, so a row group is one contiguous read (candle
//!   reads a column per stream) and their four f16 scales convert in one F16C instruction
//!   (candle converts each through `half`'s runtime-dispatched, out-of-line function);
//! - each group's weights, once loaded, serve two input vectors, so a decoding step of `n`
//!   sequences reads the weights `n / 2` times, where candle's kernel (or f32 gemm) gave
//!   no gain over f32 from four sequences on.
//!
//! On the 2-core dev host, one decoding sequence went from 55-64 to 83-105 tokens/s (100 or
//! more in four runs of five; `cargo bench --bench core -- decode`; README: Benchmarks).
//!
//! The rows are shared out over candle's spinning pool, as its own matmul does: a step runs
//! ~200 of these products, too short to wake sleeping threads for.

use std::ops::Range;

use candle_core::{Result, Tensor};
use half::f16;

/// Values per quantization block (q8_0's).
const BLOCK: usize = 32;

/// Matrix rows stored, and computed, together.
const GROUP: usize = 4;

/// Input vectors computed together: a pass over the weights serves two of them (four would
/// need more accumulators than AVX2 has registers).
const PAIR: usize = 2;

/// Block `b` of four consecutive rows, side by side, so that a pass over a row group reads
/// one contiguous stream (the same 34 bytes per block as q8_0's own layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Group {
    scales: [f16; GROUP],
    quants: [[i8; BLOCK]; GROUP],
}

#[derive(Debug)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// Row group `g`'s block `b` at `g * cols / BLOCK + b`; rows past `rows` are zeros.
    groups: Vec<Group>,
}

/// One vector quantized to q8_0 blocks (f16-rounded scales held as f32).
struct Q8Vector {
    scales: Vec<f32>,
    quants: Vec<i8>,
}

/// q8_0 quantization of one block, exactly as candle does it: the scale is amax / 127,
/// values are rounded with the unrounded scale, and the scale is stored as f16.
fn quantize_block(xs: &[f32], quants: &mut [i8]) -> f16 {
    let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &x) in quants.iter_mut().zip(xs) {
        *q = (x * id).round() as i8;
    }
    f16::from_f32(d)
}

impl Q8Vector {
    fn quantize(xs: &[f32]) -> Self {
        let mut quants = vec![0i8; xs.len()];
        let scales = xs
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .map(|(x, q)| quantize_block(x, q).to_f32())
            .collect();
        Self { scales, quants }
    }
}

impl Q8Matrix {
    /// `weight`: `[out, in]` f32, `in` a multiple of 32.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let (rows, cols) = weight.dims2()?;
        if cols % BLOCK != 0 {
            candle_core::bail!("q8_0 needs rows of a multiple of {BLOCK} values, not {cols}");
        }
        let values = weight
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let blocks = cols / BLOCK;
        let empty = Group {
            scales: [f16::ZERO; GROUP],
            quants: [[0; BLOCK]; GROUP],
        };
        let mut groups = vec![empty; rows.div_ceil(GROUP) * blocks];
        for (row, xs) in values.chunks_exact(cols).enumerate() {
            for (b, block) in xs.chunks_exact(BLOCK).enumerate() {
                let group = &mut groups[row / GROUP * blocks + b];
                let r = row % GROUP;
                group.scales[r] = quantize_block(block, &mut group.quants[r]);
            }
        }
        Ok(Self { rows, cols, groups })
    }

    /// `x @ W^T` over the last dimension of `x` (any leading dimensions; meant for a few
    /// rows).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (lead, inner) = dims.split_at(dims.len() - 1);
        if inner != [self.cols] {
            candle_core::bail!(
                "q8_0 matrix: input has {inner:?} features, not {}",
                self.cols
            );
        }
        let xs = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let xs: Vec<Q8Vector> = xs.chunks_exact(self.cols).map(Q8Vector::quantize).collect();
        let mut out = vec![0f32; xs.len() * self.rows];
        self.matmul(&xs, &mut out);
        let mut out_dims = lead.to_vec();
        out_dims.push(self.rows);
        Tensor::from_vec(out, out_dims, x.device())
    }

    /// `out[j * rows + i]` = row `i` · `xs[j]`. The pool's threads share out the row
    /// groups; each reads its groups' weights once per pair of vectors.
    fn matmul(&self, xs: &[Q8Vector], out: &mut [f32]) {
        let out = SharedOut(out.as_mut_ptr());
        let groups = self.rows.div_ceil(GROUP);
        candle_core::utils::barrier_pool().execute_chunked(groups, |range| {
            for (pair, first) in xs.chunks(PAIR).zip((0..).step_by(PAIR)) {
                // SAFETY: work items cover disjoint row groups, so each output element is
                // written by one thread, and `out` outlives the pool's call (execute_chunked
                // returns when every item is done).
                unsafe { self.groups_into(pair, range.clone(), out, first) };
            }
        });
    }

    /// Rows of `groups` times each of `xs`, written at `out[(first + j) * rows + row]`.
    ///
    /// # Safety
    /// `out` holds `(first + xs.len()) * rows` values, and no other thread writes these.
    unsafe fn groups_into(
        &self,
        xs: &[Q8Vector],
        groups: Range<usize>,
        out: SharedOut,
        first: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_simd() {
            // SAFETY: the CPU has the features the kernel is compiled for; the caller
            // vouches for `out`.
            unsafe {
                if let [a, b] = xs {
                    avx2::groups_into::<2>(self, [a, b], groups, out, first);
                } else {
                    for (j, x) in xs.iter().enumerate() {
                        avx2::groups_into::<1>(self, [x], groups.clone(), out, first + j);
                    }
                }
            };
            return;
        }
        for (j, x) in xs.iter().enumerate() {
            for row in groups.start * GROUP..(groups.end * GROUP).min(self.rows) {
                let dot = self.row_dot(x, row);
                unsafe { out.write((first + j) * self.rows + row, dot) };
            }
        }
    }

    /// One row times one vector without SIMD (other CPUs): the same terms, summed in
    /// another order.
    fn row_dot(&self, x: &Q8Vector, row: usize) -> f32 {
        let blocks = self.cols / BLOCK;
        let (g, r) = (row / GROUP, row % GROUP);
        (0..blocks)
            .map(|b| {
                let group = &self.groups[g * blocks + b];
                let v = &x.quants[b * BLOCK..][..BLOCK];
                let sum: i32 = group.quants[r]
                    .iter()
                    .zip(v)
                    .map(|(&w, &v)| w as i32 * v as i32)
                    .sum();
                group.scales[r].to_f32() * x.scales[b] * sum as f32
            })
            .sum()
    }
}

/// AVX2, FMA and F16C: the kernel's features.
fn has_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The output, written by the pool's threads at disjoint rows.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `at` is inside the output and no other thread touches it.
    unsafe fn write(self, at: usize, value: f32) {
        unsafe { *self.0.add(at) = value }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Q8Matrix, Q8Vector, SharedOut, BLOCK, GROUP};

    /// Per block: |w| · sign(x, w) in u8 × i8 pairs, summed to eight i32 lanes, to f32, then
    /// scaled and accumulated; the eight lanes are summed at the end (candle's order). Each
    /// group's weights are loaded once for the `N` vectors.
    ///
    /// # Safety
    /// As `Q8Matrix::groups_into`, on a CPU with AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn groups_into<const N: usize>(
        m: &Q8Matrix,
        xs: [&Q8Vector; N],
        groups: Range<usize>,
        out: SharedOut,
        first: usize,
    ) {
        let blocks = m.cols / BLOCK;
        let ones = _mm256_set1_epi16(1);
        let block_sum = |w: __m256i, v: __m256i| {
            let products = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w));
            _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, products))
        };
        for g in groups {
            let mut acc = [[_mm256_setzero_ps(); GROUP]; N];
            for (group, b) in m.groups[g * blocks..][..blocks].iter().zip(0..) {
                let w_scales =
                    _mm_cvtph_ps(unsafe { _mm_loadl_epi64(group.scales.as_ptr().cast()) });
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
                    if row < m.rows {
                        unsafe { out.write((first + j) * m.rows + row, hsum(acc)) };
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module};

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        // A small LCG: reproducible values in [-1, 1) with some large ones.
        let mut s = seed;
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if i % 97 == 0 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_candles_q8_0_matmul_bit_for_bit() {
        // 4k + 2 rows: a partial row group at the end; 576 columns as in SmolLM2.
        let weight = random((1538, 576), 1);
        let ours = Q8Matrix::quantize(&weight).unwrap();
        let candle =
            QMatMul::from_qtensor(QTensor::quantize(&weight, GgmlDType::Q8_0).unwrap()).unwrap();
        // Vectors go through in pairs: 3 and 5 end with a single one.
        for rows in [1, 2, 3, 5] {
            let x = random((rows, 576), 7 + rows as u64)
                .reshape((1, rows, 576))
                .unwrap();
            let want = candle.forward(&x).unwrap();
            let got = ours.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let (got, want) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            if has_simd() {
                assert_eq!(got, want, "{rows} rows");
            }
            // The fallback for CPUs without AVX2: the same terms in another order.
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (j, x) in xs.chunks_exact(576).enumerate() {
                let x = Q8Vector::quantize(x);
                for row in [0, 1, 777, 1537] {
                    let (g, w) = (ours.row_dot(&x, row), want[j * 1538 + row]);
                    assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn a_zero_block_and_a_bad_shape() {
        let weight = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let m = Q8Matrix::quantize(&weight).unwrap();
        let x = random((1, 64), 3);
        let out = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out, vec![vec![0.0; 4]]);
        assert!(m.forward(&random((1, 32), 3)).is_err());
        assert!(Q8Matrix::quantize(&random((2, 48), 3)).is_err());
    }
}
