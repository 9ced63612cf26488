//! A frozen matrix in q8_0 times a few vectors: the quantized path of decoding steps.
//!
//! Weights and inputs are q8_0 blocks (candle's quantization). The weights are laid out in
//! panels of 16 rows, interleaved four bytes at a time, so that one instruction multiplies
//! four values of many rows by one broadcast word of the input. Two kernels, picked at
//! load by what the CPU has, compute the same arithmetic, that of `panel_row_dot`, which
//! unit tests hold both to bit for bit: each block's integer dot product exactly, then
//! (as f32) times the two scales, fused-added in block order. So a sequence's result
//! depends neither on what it is batched with nor on the CPU.
//! - **AVX-512 VNNI** (`vnni`): one `vpdpbusd` per four values of all 16 rows.
//! - **AVX2** (`avx2`): `vpmaddubsw` and `vpmaddwd` per four values of eight rows.
//! - Otherwise `panel_row_dot` itself.
//!
//! A panel's weights, once loaded, serve every vector of a step (a few per pass, the rest
//! from L1), so memory is read once per decoding step whatever the number of sequences.
//! Against candle's `QMatMul`, the result differs only in rounding (it sums fewer f32
//! terms: candle's AVX2 kernel converts eight partial sums a block to f32).
//!
//! The rows are shared out over candle's spinning pool, as its own matmul does: a step runs
//! ~200 of these products, too short to wake sleeping threads for.

/// Runs `$body` for each pass of up to four of the vectors `$xs`, with `$pass` bound to
/// the pass as an array of references (each size compiles to a kernel of its own, its
/// accumulators in registers) and `$first` to the index of its first vector. Four: the
/// accumulators, weights and temporaries then fill AVX2's 16 registers, eight were no
/// faster with VNNI (LLVM kept the accumulators in memory), and a panel's weights stay in
/// L1 for the next pass.
#[cfg(target_arch = "x86_64")]
macro_rules! for_each_pass {
    ($xs:expr, |$pass:ident, $first:ident| $body:expr) => {{
        let mut $first = 0;
        for chunk in $xs.chunks(4) {
            match chunk {
                [a, b, c, d] => {
                    let $pass = [a, b, c, d];
                    $body
                }
                [a, b, c] => {
                    let $pass = [a, b, c];
                    $body
                }
                [a, b] => {
                    let $pass = [a, b];
                    $body
                }
                [a] => {
                    let $pass = [a];
                    $body
                }
                _ => {}
            }
            $first += chunk.len();
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod vnni;

use candle_core::{Result, Tensor};
use half::f16;

use super::disjoint::DisjointOut;

/// Values per quantization block (q8_0's).
const BLOCK: usize = 32;

/// Rows of a panel: one 512-bit lane of i32 per row for VNNI, two 256-bit halves for AVX2.
const PANEL: usize = 16;

/// Four-value steps of a block: `vpdpbusd` sums four byte products per lane.
const STEPS: usize = BLOCK / 4;

/// 16 rows interleaved: panel `p`'s block `b` holds, for each step `s`, 64 bytes: values
/// `4s..4s + 4` of the block, of each row in turn, at
/// `((p * blocks + b) * STEPS + s) * 64 + row * 4`. Values are stored plus 128, as
/// `vpdpbusd` multiplies unsigned bytes by signed ones. Scales, as f32, at
/// `(p * blocks + b) * PANEL + row`. Rows past the matrix are zeros.
#[derive(Debug)]
struct Panels {
    quants: Vec<u8>,
    scales: Vec<f32>,
}

/// Which kernel multiplies a matrix (all read the same layout).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kernel {
    Vnni,
    Avx2,
    /// `panel_row_dot`, row by row.
    Scalar,
}

impl Kernel {
    fn detect() -> Self {
        if has_vnni() {
            Self::Vnni
        } else if has_avx2() {
            Self::Avx2
        } else {
            Self::Scalar
        }
    }
}

#[derive(Debug)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    panels: Panels,
    kernel: Kernel,
}

/// One vector quantized to q8_0 blocks (f16-rounded scales held as f32).
struct Q8Vector {
    scales: Vec<f32>,
    quants: Vec<i8>,
    /// Minus 128 × each block's sum of values: the VNNI kernel's unsigned weights (stored
    /// plus 128) add its opposite.
    offsets: Vec<i32>,
}

/// q8_0 quantization of one block, exactly as candle does it: the scale is amax / 127,
/// values are rounded with the unrounded scale, and the scale is stored as f16.
#[inline(always)]
fn quantize_block(xs: &[f32], quants: &mut [i8]) -> f16 {
    // The largest magnitude, taken on the bits (without the sign, a float's bits order as
    // its magnitude): unlike an f32 max, this vectorises. (A NaN would win here, where
    // candle skips it; no finite input differs.)
    let mut bits = 0;
    for x in xs {
        bits = bits.max(x.to_bits() & 0x7fff_ffff);
    }
    let amax = f32::from_bits(bits);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &x) in quants.iter_mut().zip(xs) {
        // Within ±127 by construction; the clamp (which also maps a NaN into range) lets
        // the unchecked conversion vectorise, where `as i8`'s saturation kept it scalar.
        #[allow(clippy::manual_clamp)] // `clamp` would keep a NaN, and the conversion UB
        let v = (x * id).round().max(-127.0).min(127.0);
        // SAFETY: `v` is finite and within i32's range.
        *q = unsafe { v.to_int_unchecked::<i32>() } as i8;
    }
    f16::from_f32(d)
}

impl Q8Vector {
    /// Every decoding step quantizes each matrix's input: compiled for AVX2 where the CPU
    /// has it, the loops vectorise (rounding included), which they cannot for baseline
    /// x86-64.
    fn quantize(xs: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { Self::quantize_avx2(xs) };
        }
        Self::quantize_any(xs)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn quantize_avx2(xs: &[f32]) -> Self {
        Self::quantize_any(xs)
    }

    #[inline(always)]
    fn quantize_any(xs: &[f32]) -> Self {
        // Plain loops: a closure handed to `collect` would be compiled outside this
        // function's target features (and call `roundf` per value).
        let blocks = xs.len() / BLOCK;
        let mut quants = vec![0i8; xs.len()];
        let mut scales = Vec::with_capacity(blocks);
        let mut offsets = Vec::with_capacity(blocks);
        for (x, q) in xs.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK)) {
            scales.push(quantize_block(x, q).to_f32());
            let mut sum = 0i32;
            for &v in q.iter() {
                sum += v as i32;
            }
            offsets.push(-128 * sum);
        }
        Self {
            scales,
            quants,
            offsets,
        }
    }
}

impl Q8Matrix {
    /// `weight`: `[out, in]` f32, `in` a multiple of 32; multiplied by the best kernel this
    /// CPU has.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        Self::quantize_for(weight, Kernel::detect())
    }

    /// The most sequences a decoding step should bring here rather than to f32 gemm
    /// (both kernels read the weights once a step). `cargo bench --bench core --
    /// decode_batch` on 2026-12-03, at 16 / 32 / 64 sequences: with VNNI, q8_0 532-568 /
    /// 618 / 592 tokens/s against f32's 160-162 / 210 / 290; with AVX2 only, 264 / 289 /
    /// 288 against 85 / 103 / 129 (docs/benchmarks.md).
    pub const DECODE_MAX_ROWS: usize = 64;

    fn quantize_for(weight: &Tensor, kernel: Kernel) -> Result<Self> {
        let (rows, cols) = weight.dims2()?;
        if cols % BLOCK != 0 {
            candle_core::bail!("q8_0 needs rows of a multiple of {BLOCK} values, not {cols}");
        }
        let values = weight
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let blocks = cols / BLOCK;
        let panels = rows.div_ceil(PANEL) * blocks;
        let mut quants = vec![128u8; panels * BLOCK * PANEL];
        let mut scales = vec![0f32; panels * PANEL];
        let mut q = [0i8; BLOCK];
        for (row, xs) in values.chunks_exact(cols).enumerate() {
            let (p, r) = (row / PANEL, row % PANEL);
            for (b, block) in xs.chunks_exact(BLOCK).enumerate() {
                let at = p * blocks + b;
                scales[at * PANEL + r] = quantize_block(block, &mut q).to_f32();
                for (s, four) in q.chunks_exact(4).enumerate() {
                    let to = (at * STEPS + s) * 64 + r * 4;
                    for (u, &v) in quants[to..to + 4].iter_mut().zip(four) {
                        *u = (v as u8) ^ 0x80;
                    }
                }
            }
        }
        Ok(Self {
            rows,
            cols,
            panels: Panels { quants, scales },
            kernel,
        })
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
        let mut out_dims = lead.to_vec();
        out_dims.push(self.rows);
        Tensor::from_vec(self.forward_rows(&xs), out_dims, x.device())
    }

    /// `xs @ W^T` for rows of `cols` values laid end to end (`xs.len()` a multiple of
    /// `cols`); the result's rows likewise.
    pub fn forward_rows(&self, xs: &[f32]) -> Vec<f32> {
        let xs: Vec<Q8Vector> = xs.chunks_exact(self.cols).map(Q8Vector::quantize).collect();
        let mut out = vec![0f32; xs.len() * self.rows];
        self.matmul(&xs, &mut out);
        out
    }

    /// `out[j * rows + i]` = row `i` · `xs[j]`. The pool's threads share out the panels.
    fn matmul(&self, xs: &[Q8Vector], out: &mut [f32]) {
        let out = DisjointOut::new(out);
        // SAFETY: work items are disjoint panels, so each output element is written by one
        // thread, and `out` outlives the pool's call (execute_chunked returns when every
        // item is done); `out` holds `xs.len() * rows` values.
        candle_core::utils::barrier_pool().execute_chunked(self.rows.div_ceil(PANEL), |range| {
            for p in range {
                unsafe { self.panel_into(xs, p, out) };
            }
        })
    }

    /// Panel `p` times every one of `xs`, by this matrix's kernel.
    ///
    /// # Safety
    /// `out` holds `xs.len() * rows` values, and no other thread writes this panel's.
    unsafe fn panel_into(&self, xs: &[Q8Vector], p: usize, out: DisjointOut) {
        let (panels, shape) = (&self.panels, (self.rows, self.cols));
        match self.kernel {
            // SAFETY (each call): the kernel was picked for what the CPU has; the caller
            // vouches for `out`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { vnni::panel_into(panels, shape, xs, p, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::panel_into(panels, shape, xs, p, out) },
            _ => {
                for (j, x) in xs.iter().enumerate() {
                    for row in p * PANEL..((p + 1) * PANEL).min(self.rows) {
                        let dot = panel_row_dot(panels, self.cols, x, row);
                        unsafe { out.write(j * self.rows + row, dot) };
                    }
                }
            }
        }
    }
}

/// One row times one vector, exactly as the kernels compute it: each
/// block's exact integer dot product, times (weight scale × input scale), fused-added to
/// the running sum in block order.
fn panel_row_dot(panels: &Panels, cols: usize, x: &Q8Vector, row: usize) -> f32 {
    let blocks = cols / BLOCK;
    let (p, r) = (row / PANEL, row % PANEL);
    (0..blocks).fold(0f32, |acc, b| {
        let at = p * blocks + b;
        let sum: i32 = (0..BLOCK)
            .map(|i| {
                let w = panels.quants[(at * STEPS + i / 4) * 64 + r * 4 + i % 4] as i32 - 128;
                w * x.quants[b * BLOCK + i] as i32
            })
            .sum();
        (sum as f32).mul_add(panels.scales[at * PANEL + r] * x.scales[b], acc)
    })
}

/// AVX2 and FMA: the AVX2 kernel's features.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX-512F and AVX-512 VNNI: the VNNI kernel's features.
fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests;
