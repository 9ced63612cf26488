//! A linear map by a frozen weight matrix.
//!
//! candle's `matmul` backward always computes the gradient of *both* operands, so a plain
//! `x.matmul(w)` makes every backward pass also pay for a weight gradient that a frozen
//! model throws away (as much work again as the forward matmul). `FrozenLinear` is a custom
//! op whose backward only returns the gradient with respect to its input.
//!
//! For serving, a copy may also carry the weight re-quantized (`quantized`): a decoding
//! step without gradient then goes through a quantized matmul, which reads a quarter of
//! the bytes (such a step is bound by those reads): q8_0 through `q8_matvec` for up to 64
//! sequences, other types through candle's for one or two.

use std::sync::{Arc, OnceLock};

use super::q8_matvec::Q8Matrix;
use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Storage, Tensor};

/// Rows that any quantized matmul serves: through candle's kernel it paid off only for a
/// row or two (decoding one or two sequences), where reading the weights dominates; from 4
/// rows on f32 gemm was as fast or faster (`cargo bench --bench core decode_batch`: q8_0
/// 66/97/79/93/99 tokens/s at 1/2/4/8/16 sequences against f32's 24/44/80/122/200).
const QUANTIZED_MAX_ROWS: usize = 2;

#[derive(Debug, Clone)]
pub struct FrozenLinear {
    /// `[in, out]`, stored contiguous: gemm is markedly faster on it than on a transposed
    /// view when few rows go through (prefill of one sequence, decoding).
    weight_t: Tensor,
    /// `[out, in]` contiguous, for the backward pass (~30% faster there than the
    /// transposed view). Made on first use, so serving never holds the second copy.
    weight_rows: Arc<OnceLock<Tensor>>,
    /// The weight re-quantized, for inputs without gradient (serving), when asked for.
    quantized: Option<Arc<Quantized>>,
}

/// A re-quantized weight and the kernel that serves it.
#[derive(Debug)]
enum Quantized {
    Q8(Q8Matrix),
    Candle(QMatMul),
}

impl Quantized {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Q8(m) => m.forward(x),
            Self::Candle(m) => m.forward(&x.contiguous()?),
        }
    }
}

impl FrozenLinear {
    /// `weight`: `[out, in]`, as stored by HF and GGUF.
    pub fn new(weight: &Tensor) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            weight_rows: Arc::new(OnceLock::new()),
            quantized: None,
        })
    }

    /// A copy whose gradient-free forward uses the weight quantized to `dtype` (the f32
    /// weight stays shared for differentiable inputs).
    pub fn quantized(&self, dtype: GgmlDType) -> Result<Self> {
        let rows = self.weight()?.contiguous()?;
        let quantized = match dtype {
            // A CPU kernel: on a GPU, candle's own quantized matmul serves.
            GgmlDType::Q8_0 if rows.device().is_cpu() => Quantized::Q8(Q8Matrix::quantize(&rows)?),
            _ => Quantized::Candle(QMatMul::from_qtensor(QTensor::quantize(&rows, dtype)?)?),
        };
        Ok(Self {
            quantized: Some(Arc::new(quantized)),
            ..self.clone()
        })
    }

    /// Like `new`, for a weight the caller keeps anyway (the tied embedding): its `[out, in]`
    /// layout serves the backward pass at no extra memory.
    pub fn sharing(weight: &Tensor) -> Result<Self> {
        let this = Self::new(weight)?;
        let _ = this.weight_rows.set(weight.contiguous()?);
        Ok(this)
    }

    /// The weight as `[out, in]` (a view).
    pub fn weight(&self) -> Result<Tensor> {
        self.weight_t.t()
    }

    pub fn out_features(&self) -> usize {
        self.weight_t.dims()[1]
    }

    /// `x @ W^T` over the last dimension of `x` (any leading dimensions).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(q) = self.quantized_for(x) {
            return q.forward(x);
        }
        let dims = x.dims().to_vec();
        let (lead, inner) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let flat = x.reshape((rows, inner[0]))?;
        let out = flat.apply_op1(self.clone())?;
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features());
        out.reshape(out_dims)
    }

    /// Like [`FrozenLinear::forward`], but where the quantized path serves, the `k` largest
    /// outputs of each row are recomputed exactly in f32 (the others keep their quantized
    /// values). For an LM head: the argmax, and the top of a sampling distribution, are
    /// then f32's whenever f32's best tokens are among the quantized top `k`.
    pub fn forward_rescored(&self, x: &Tensor, k: usize) -> Result<Tensor> {
        let out = self.forward(x)?;
        if self.quantized_for(x).is_none() {
            return Ok(out);
        }
        let n = self.out_features();
        let k = k.min(n);
        if k == 0 {
            return Ok(out);
        }
        let inner = x.dim(candle_core::D::Minus1)?;
        let xs = x.reshape(((), inner))?;
        let rows = xs.dim(0)?;
        let mut values = out.reshape((rows, n))?.to_vec2::<f32>()?;
        // Every row's best k at once: one gather and one batched matmul (per row, the
        // calls cost more than the arithmetic).
        let best: Vec<Vec<u32>> = values.iter().map(|row| largest(row, k)).collect();
        let idx = Tensor::from_vec(best.concat(), rows * k, x.device())?;
        // The weight's rows where they are kept (a tied head: the embedding); otherwise
        // the columns of the stored transpose (an untied head keeps no second copy).
        let gathered = match self.weight_rows.get() {
            Some(w) => w.index_select(&idx, 0)?,
            None => self.weight_t.index_select(&idx, 1)?.t()?.contiguous()?,
        };
        let exact = gathered
            .reshape((rows, k, inner))?
            .matmul(&xs.unsqueeze(2)?)?
            .reshape((rows, k))?
            .to_vec2::<f32>()?;
        for ((row, best), exact) in values.iter_mut().zip(best).zip(exact) {
            for (i, v) in best.into_iter().zip(exact) {
                row[i as usize] = v;
            }
        }
        Tensor::from_vec(values.concat(), out.shape(), out.device())
    }

    /// The q8_0 matrix of a quantized serving copy on CPU, if this is one.
    pub(crate) fn q8(&self) -> Option<&Q8Matrix> {
        match self.quantized.as_deref() {
            Some(Quantized::Q8(m)) => Some(m),
            _ => None,
        }
    }

    /// The quantized matmul, when it serves `x`: a quantized copy, no gradient, and at most
    /// `QUANTIZED_MAX_ROWS` rows, or for q8_0 a decoding step (one position per sequence)
    /// of at most as many sequences as its kernel serves well (`Q8Matrix::DECODE_MAX_ROWS`).
    /// Prefill (several positions per sequence) stays f32, so head tags never see the
    /// quantized weights.
    fn quantized_for(&self, x: &Tensor) -> Option<&Quantized> {
        let dims = x.dims();
        let rows = x.elem_count() / dims.last().copied().unwrap_or(1).max(1);
        let one_position_each = dims.len() < 3 || dims[dims.len() - 2] == 1;
        self.quantized.as_deref().filter(|q| {
            let decoding = match q {
                Quantized::Q8(_) => one_position_each && rows <= Q8Matrix::DECODE_MAX_ROWS,
                Quantized::Candle(_) => false,
            };
            !x.track_op() && (rows <= QUANTIZED_MAX_ROWS || decoding)
        })
    }

    fn shape_of(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        let (m, k) = l.shape().dims2()?;
        let (wk, n) = self.weight_t.dims2()?;
        if wk != k {
            candle_core::bail!("frozen linear: input has {k} features, weight expects {wk}");
        }
        Ok((m, n, k))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = self.shape_of(l)?;
        let (storage, wl) = self.weight_t.storage_and_layout();
        let Storage::Cpu(w) = &*storage else {
            candle_core::bail!("frozen linear: input on cpu, weight elsewhere")
        };
        let out = s.matmul(w, (1, m, n, k), l, wl)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = self.shape_of(l)?;
        let (storage, wl) = self.weight_t.storage_and_layout();
        let Storage::Cuda(w) = &*storage else {
            candle_core::bail!("frozen linear: input on cuda, weight elsewhere")
        };
        let out = s.matmul(w, (1, m, n, k), l, wl)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // d(x W^T)/dx = grad W ; the weight gets no gradient: it is frozen.
        let rows = match self.weight_rows.get() {
            Some(w) => w,
            None => {
                let w = self.weight_t.t()?.contiguous()?;
                self.weight_rows.get_or_init(|| w)
            }
        };
        Ok(Some(grad_res.matmul(rows)?))
    }
}

/// The indices of the `k` largest of `values` (`k` ≥ 1; ties at the edge: any of them), in
/// about one pass: candidates above a floor that rises each time their buffer fills (to
/// the `k`-th best so far), so that after the first few hundred values almost none is kept.
fn largest(values: &[f32], k: usize) -> Vec<u32> {
    use std::cmp::Ordering::Greater;
    // Keeps the best k of `kept`, the k-th last.
    let keep_best = |kept: &mut Vec<(f32, u32)>| {
        kept.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        kept.truncate(k);
    };
    let room = 8 * k;
    let mut kept: Vec<(f32, u32)> = Vec::with_capacity(room);
    let mut floor: Option<f32> = None;
    for (i, &v) in values.iter().enumerate() {
        if floor.is_some_and(|f| v.total_cmp(&f) != Greater) {
            continue;
        }
        if kept.len() == room {
            keep_best(&mut kept);
            floor = Some(kept[k - 1].0);
            if v.total_cmp(&kept[k - 1].0) != Greater {
                continue;
            }
        }
        kept.push((v, i as u32));
    }
    if kept.len() > k {
        keep_best(&mut kept);
    }
    kept.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::largest;

    #[test]
    fn largest_finds_the_k_best_values() {
        // Rising, falling and scrambled orders (the floor rises early, late, or in steps),
        // and fewer values than the buffer holds.
        let n = 5_000u32;
        let scrambled: Vec<f32> = (0..n).map(|i| ((i * 7_919) % n) as f32).collect();
        let rising: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let falling: Vec<f32> = rising.iter().rev().copied().collect();
        let few: Vec<f32> = vec![3.0, -1.0, 7.0, 7.0, 0.5];
        for (values, k) in [(&scrambled, 64), (&rising, 64), (&falling, 1), (&few, 3)] {
            let mut want = values.clone();
            want.sort_by(|a, b| b.total_cmp(a));
            want.truncate(k);
            let mut got: Vec<f32> = largest(values, k)
                .into_iter()
                .map(|i| values[i as usize])
                .collect();
            got.sort_by(|a, b| b.total_cmp(a));
            assert_eq!(got, want);
        }
    }
}
