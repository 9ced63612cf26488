//! Where learned parameters start: tag vectors (mean embedding, a phrase, a copy of a
//! tag) and heads fitted in closed form on frozen features, so that step 0 is already a
//! linear probe and training only has to improve on it.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::hyperparameters::TagInit;
use crate::model::BaseModel;
use crate::tags::TagSet;

/// The paper's initialisation: the mean token embedding, rescaled to the average token
/// norm, repeated `p` times.
pub fn mean_embedding_init(model: &BaseModel, p: usize) -> Result<Tensor> {
    let e = &model.llama.weights().embed;
    let avg_norm = e.sqr()?.sum(1)?.sqrt()?.mean_all()?;
    let mean = e.mean(0)?;
    let mean_norm = mean.sqr()?.sum_all()?.sqrt()?;
    let row = mean.broadcast_mul(&avg_norm.broadcast_div(&mean_norm)?)?;
    Ok(row.unsqueeze(0)?.repeat((p, 1))?)
}

/// `p` rows taken from `rows` in order, cycling when it has fewer.
fn cycled(rows: &Tensor, p: usize) -> Result<Tensor> {
    let n = rows.dim(0)?;
    ensure!(n > 0, "nothing to initialise from");
    let idx: Vec<u32> = (0..p).map(|i| (i % n) as u32).collect();
    Ok(rows.index_select(&Tensor::new(idx.as_slice(), rows.device())?, 0)?)
}

/// The `[p, d]` starting vectors of a learned tag.
pub fn tag_init(model: &BaseModel, frozen: &TagSet, init: &TagInit, p: usize) -> Result<Tensor> {
    match init {
        TagInit::Mean => mean_embedding_init(model, p),
        TagInit::Text(phrase) => {
            let ids = model.tokenizer.encode_fragment(phrase)?;
            ensure!(!ids.is_empty(), "init: {phrase:?} has no tokens");
            cycled(&model.llama.embed_ids(&ids)?, p)
        }
        TagInit::Tag(name) => {
            let b = frozen
                .get(name)
                .with_context(|| format!("init: no served tag <{name}> to copy"))?;
            cycled(&b.vectors.to_dtype(DType::F32)?, p)
        }
    }
}

/// Features with every column scaled to mean 0 and standard deviation 1, so that one
/// penalty strength suits columns of very different scales; fits made on `rows` are
/// mapped back to the raw features with [`Standardised::to_raw`].
struct Standardised {
    mean: Vec<f64>,
    sd: Vec<f64>,
    rows: Vec<Vec<f64>>,
}

impl Standardised {
    fn new(x: &[Vec<f64>]) -> Self {
        let (n, d) = (x.len() as f64, x[0].len());
        let mut mean = vec![0.0; d];
        for row in x {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / n;
            }
        }
        let mut sd = vec![0.0; d];
        for row in x {
            for j in 0..d {
                sd[j] += (row[j] - mean[j]).powi(2) / n;
            }
        }
        for s in &mut sd {
            *s = s.sqrt().max(1e-6);
        }
        let rows = x
            .iter()
            .map(|r| {
                r.iter()
                    .zip(&mean)
                    .zip(&sd)
                    .map(|((v, m), s)| (v - m) / s)
                    .collect()
            })
            .collect();
        Self { mean, sd, rows }
    }

    /// `w . z + b` on standardised `z` as `w' . x + b'` on the raw features.
    fn to_raw(&self, w: &[f64], b: f64) -> (Vec<f64>, f64) {
        let w: Vec<f64> = w.iter().zip(&self.sd).map(|(w, s)| w / s).collect();
        let b = b - w.iter().zip(&self.mean).map(|(w, m)| w * m).sum::<f64>();
        (w, b)
    }
}

/// `X'X` (row-major `d x d`) and `X'(y - y_mean)` of the rows `x`, by one f64 matrix
/// product (thousands of rows by thousands of features take seconds, not minutes).
fn gram_and_moment(x: &[Vec<f64>], y: &[f64], y_mean: f64) -> Result<(Vec<f64>, Vec<f64>)> {
    let (n, d) = (x.len(), x[0].len());
    let rows = Tensor::from_vec(x.concat(), (n, d), &Device::Cpu)?;
    let centred: Vec<f64> = y.iter().map(|t| t - y_mean).collect();
    let t = rows.t()?;
    let gram = t.matmul(&rows)?.flatten_all()?.to_vec1::<f64>()?;
    let xty = t
        .matmul(&Tensor::from_vec(centred, (n, 1), &Device::Cpu)?)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok((gram, xty))
}

/// `a . b` with independent partial sums, so that the compiler can vectorise it (a plain
/// `sum()` must add in order); Cholesky spends its time here.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Solves `a x = b` for symmetric positive definite `a` (row-major `d x d`) by Cholesky.
fn solve_spd(a: &[f64], b: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s = dot(&l[i * d..i * d + j], &l[j * d..j * d + j]);
            if i == j {
                let v = a[i * d + i] - s;
                ensure!(v > 0.0, "the ridge system is not positive definite");
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = (a[i * d + j] - s) / l[j * d + j];
            }
        }
    }
    let mut y = vec![0.0; d];
    for i in 0..d {
        y[i] = (b[i] - (0..i).map(|k| l[i * d + k] * y[k]).sum::<f64>()) / l[i * d + i];
    }
    let mut x = vec![0.0; d];
    for i in (0..d).rev() {
        x[i] = (y[i] - (i + 1..d).map(|k| l[k * d + i] * x[k]).sum::<f64>()) / l[i * d + i];
    }
    Ok(x)
}

/// A linear map `y = w . x + b` in the features' original units.
#[derive(Debug, Clone)]
pub struct LinearFit {
    /// `[k][d]`
    pub weight: Vec<Vec<f64>>,
    /// `[k]`
    pub bias: Vec<f64>,
    /// The regularisation chosen, and the validation loss it gave (None: no validation).
    pub lambda: f64,
    pub validation_loss: Option<f64>,
}

impl LinearFit {
    pub fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let (k, d) = (self.weight.len(), self.weight[0].len());
        let w: Vec<f32> = self.weight.iter().flatten().map(|v| *v as f32).collect();
        let b: Vec<f32> = self.bias.iter().map(|v| *v as f32).collect();
        Ok((
            Tensor::from_vec(w, (k, d), device)?,
            Tensor::from_vec(b, k, device)?,
        ))
    }

    fn predict(&self, x: &[f64]) -> Vec<f64> {
        self.weight
            .iter()
            .zip(&self.bias)
            .map(|(w, b)| b + w.iter().zip(x).map(|(a, c)| a * c).sum::<f64>())
            .collect()
    }
}

/// Ridge strengths tried, relative to the standardised features (unit-variance columns,
/// so `n` is the scale of the Gram matrix's diagonal).
const RIDGE_GRID: [f64; 9] = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0];
/// Without a validation split, the strength used.
const RIDGE_DEFAULT: f64 = 1e-2;

/// Ridge regression of `y` on `x` with an unpenalised intercept, on standardised features;
/// the strength (times `n`) is chosen by mean squared error on `(x_val, y_val)` if given.
pub fn fit_ridge(
    x: &[Vec<f64>],
    y: &[f64],
    val: Option<(&[Vec<f64>], &[f64])>,
) -> Result<LinearFit> {
    ensure!(
        !x.is_empty() && x.len() == y.len(),
        "no features to fit the head on"
    );
    let (n, d) = (x.len(), x[0].len());
    let std = Standardised::new(x);
    let y_mean = y.iter().sum::<f64>() / n as f64;
    let (gram, xty) = gram_and_moment(&std.rows, y, y_mean)?;
    let fit_with = |lambda: f64| -> Result<LinearFit> {
        let mut a = gram.clone();
        for i in 0..d {
            a[i * d + i] += lambda * n as f64;
        }
        let (w, b) = std.to_raw(&solve_spd(&a, &xty, d)?, y_mean);
        Ok(LinearFit {
            weight: vec![w],
            bias: vec![b],
            lambda,
            validation_loss: None,
        })
    };
    let Some((xv, yv)) = val.filter(|(xv, _)| !xv.is_empty()) else {
        return fit_with(RIDGE_DEFAULT);
    };
    choose_on_validation(&RIDGE_GRID, fit_with, |fit| {
        xv.iter()
            .zip(yv)
            .map(|(r, t)| (fit.predict(r)[0] - t).powi(2))
            .sum::<f64>()
            / xv.len() as f64
    })
}

/// The fit of the grid's strength with the lowest validation loss (recorded in the fit).
fn choose_on_validation(
    grid: &[f64],
    fit_with: impl Fn(f64) -> Result<LinearFit>,
    validation_loss: impl Fn(&LinearFit) -> f64,
) -> Result<LinearFit> {
    let mut best: Option<LinearFit> = None;
    for &lambda in grid {
        let mut fit = fit_with(lambda)?;
        let loss = validation_loss(&fit);
        fit.validation_loss = Some(loss);
        if best
            .as_ref()
            .is_none_or(|b| loss < b.validation_loss.unwrap_or(f64::INFINITY))
        {
            best = Some(fit);
        }
    }
    best.context("an empty grid")
}

/// Strengths of the logistic head's L2 penalty tried on the validation split.
const LOGISTIC_GRID: [f64; 4] = [1e-4, 1e-3, 1e-2, 1e-1];
const LOGISTIC_PASSES: usize = 200;

/// Multinomial logistic regression of `class` on `x` (standardised features, full-batch
/// gradient descent with momentum, L2 penalty chosen by validation cross-entropy).
pub fn fit_logistic(
    x: &[Vec<f64>],
    class: &[u32],
    k: usize,
    val: Option<(&[Vec<f64>], &[u32])>,
) -> Result<LinearFit> {
    ensure!(
        !x.is_empty() && x.len() == class.len(),
        "no features to fit the head on"
    );
    let (n, d) = (x.len(), x[0].len());
    let std = Standardised::new(x);
    let softmax = |w: &[Vec<f64>], b: &[f64], r: &[f64]| -> Vec<f64> {
        let logits: Vec<f64> = (0..k)
            .map(|c| b[c] + w[c].iter().zip(r).map(|(a, v)| a * v).sum::<f64>())
            .collect();
        let top = logits.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    };
    let fit_with = |lambda: f64| -> LinearFit {
        let (mut w, mut b) = (vec![vec![0.0; d]; k], vec![0.0; k]);
        let (mut vw, mut vb) = (vec![vec![0.0; d]; k], vec![0.0; k]);
        let step = 0.5;
        for _ in 0..LOGISTIC_PASSES {
            let (mut gw, mut gb) = (vec![vec![0.0; d]; k], vec![0.0; k]);
            for (r, &c) in std.rows.iter().zip(class) {
                let p = softmax(&w, &b, r);
                for j in 0..k {
                    let err = (p[j] - if j as u32 == c { 1.0 } else { 0.0 }) / n as f64;
                    gb[j] += err;
                    for (g, v) in gw[j].iter_mut().zip(r) {
                        *g += err * v;
                    }
                }
            }
            for j in 0..k {
                vb[j] = 0.9 * vb[j] + gb[j];
                b[j] -= step * vb[j];
                for i in 0..d {
                    vw[j][i] = 0.9 * vw[j][i] + gw[j][i] + lambda * w[j][i];
                    w[j][i] -= step * vw[j][i];
                }
            }
        }
        let (weight, bias) = w.iter().zip(&b).map(|(w, b)| std.to_raw(w, *b)).unzip();
        LinearFit {
            weight,
            bias,
            lambda,
            validation_loss: None,
        }
    };
    let Some((xv, cv)) = val.filter(|(xv, _)| !xv.is_empty()) else {
        return Ok(fit_with(LOGISTIC_GRID[1]));
    };
    choose_on_validation(
        &LOGISTIC_GRID,
        |l| Ok(fit_with(l)),
        |fit| {
            xv.iter()
                .zip(cv)
                .map(|(r, &c)| {
                    let l = fit.predict(r);
                    let top = l.iter().cloned().fold(f64::MIN, f64::max);
                    let lse = top + l.iter().map(|v| (v - top).exp()).sum::<f64>().ln();
                    lse - l[c as usize]
                })
                .sum::<f64>()
                / xv.len() as f64
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_small_system() {
        let a = [4.0, 2.0, 2.0, 3.0];
        let x = solve_spd(&a, &[2.0, 1.0], 2).unwrap();
        assert!((4.0 * x[0] + 2.0 * x[1] - 2.0).abs() < 1e-12);
        assert!((2.0 * x[0] + 3.0 * x[1] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ridge_recovers_a_linear_map_in_raw_units() {
        // Columns on very different scales, as final hidden states have.
        let x: Vec<Vec<f64>> = (0..200)
            .map(|i| {
                let t = i as f64;
                vec![
                    (t * 0.37).sin() * 300.0,
                    (t * 0.11).cos(),
                    (t * 0.05).sin() * 0.01,
                ]
            })
            .collect();
        let y: Vec<f64> = x
            .iter()
            .map(|r| 0.002 * r[0] - 1.5 * r[1] + 40.0 * r[2] + 0.7)
            .collect();
        let fit = fit_ridge(&x, &y, Some((&x[..50], &y[..50]))).unwrap();
        assert_eq!(
            fit.lambda, RIDGE_GRID[0],
            "noise-free data wants the least penalty"
        );
        for (r, t) in x.iter().zip(&y) {
            assert!(
                (fit.predict(r)[0] - t).abs() < 1e-2,
                "{} vs {t}",
                fit.predict(r)[0]
            );
        }
    }

    #[test]
    fn logistic_separates_separable_classes() {
        let x: Vec<Vec<f64>> = (0..90)
            .map(|i| vec![(i % 3) as f64 * 10.0 + (i as f64 * 0.1).sin(), 1.0])
            .collect();
        let c: Vec<u32> = (0..90).map(|i| (i % 3) as u32).collect();
        let fit = fit_logistic(&x, &c, 3, Some((&x[..30], &c[..30]))).unwrap();
        for (r, &want) in x.iter().zip(&c) {
            let l = fit.predict(r);
            let got = (0..3).max_by(|a, b| l[*a].total_cmp(&l[*b])).unwrap();
            assert_eq!(got as u32, want);
        }
    }
}
