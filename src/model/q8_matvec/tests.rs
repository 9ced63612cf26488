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

/// candle's own q8_0 matmul of `weight`, the reference both kernels are held to.
fn candle_q8_0(weight: &Tensor) -> QMatMul {
    QMatMul::from_qtensor(QTensor::quantize(weight, GgmlDType::Q8_0).unwrap()).unwrap()
}

/// The kernels this CPU can run.
fn kernels() -> Vec<Kernel> {
    let mut kernels = vec![Kernel::Scalar];
    if has_avx2() {
        kernels.push(Kernel::Avx2);
    }
    if has_vnni() {
        kernels.push(Kernel::Vnni);
    }
    kernels
}

#[test]
fn kernels_equal_their_scalar_reference_and_are_close_to_candle() {
    // 16k + 2 rows: a partial panel (and a partial half panel) at the end; 576 columns
    // as in SmolLM2.
    let weight = random((1538, 576), 2);
    let candle = candle_q8_0(&weight);
    // VNNI passes take 4, 2 and 1 vectors, AVX2's 4 to 1: 15, 6 and 3 use each kind.
    for kernel in kernels() {
        let ours = Q8Matrix::quantize_for(&weight, kernel).unwrap();
        for rows in [1, 3, 6, 15, 16] {
            let x = random((rows, 576), 11 + rows as u64);
            let got = ours.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let want = candle.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let xs = x.to_vec2::<f32>().unwrap();
            for (j, (got, want)) in got.iter().zip(&want).enumerate() {
                let xq = Q8Vector::quantize(&xs[j]);
                let reference: Vec<f32> = (0..1538)
                    .map(|row| panel_row_dot(&ours.panels, 576, &xq, row))
                    .collect();
                assert_eq!(got, &reference, "{kernel:?}: vector {j} of {rows}");
                // The same products as candle's; only the f32 rounding differs.
                for (r, w) in reference.iter().zip(want) {
                    assert!((r - w).abs() <= 1e-4 * w.abs().max(1.0), "{r} vs {w}");
                }
            }
        }
    }
}

#[test]
fn a_vector_gets_the_same_result_alone_and_among_sixteen() {
    let weight = random((100, 64), 4);
    let x = random((16, 64), 5);
    for kernel in kernels() {
        let m = Q8Matrix::quantize_for(&weight, kernel).unwrap();
        let all = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for (j, row) in all.iter().enumerate() {
            let alone = m.forward(&x.narrow(0, j, 1).unwrap()).unwrap();
            assert_eq!(&alone.to_vec2::<f32>().unwrap()[0], row, "{kernel:?}, {j}");
        }
    }
}

#[test]
fn non_finite_inputs_quantize_within_range() {
    // Nothing a broken activation holds may reach the unchecked conversion out of range.
    let mut xs = vec![0.5f32; 64];
    xs[3] = f32::NAN;
    xs[40] = f32::INFINITY;
    xs[41] = -2.0;
    let q = Q8Vector::quantize(&xs);
    assert!(q.quants.iter().all(|v| (-127..=127).contains(v)));
    assert_eq!(q.quants.len(), 64);
}

#[test]
fn a_zero_block_and_a_bad_shape() {
    let weight = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    for kernel in kernels() {
        let m = Q8Matrix::quantize_for(&weight, kernel).unwrap();
        let x = random((1, 64), 3);
        let out = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out, vec![vec![0.0; 4]]);
        assert!(m.forward(&random((1, 32), 3)).is_err());
        assert!(Q8Matrix::quantize_for(&random((2, 48), 3), kernel).is_err());
    }
}
