//! A function tag's head while it trains: the paper's linear map on the hidden states it
//! reads, or, with `head_hidden`, one layer of tanh units before that map (an MLP head).

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::job::Target;
use crate::model::BaseModel;
use crate::tags::bundle::{head_hidden, head_output};
use crate::tags::{Head, HeadSpec};

pub(super) struct HeadVars {
    /// `[h, inputs]` and `[h]`, tanh after: an MLP head's hidden layer.
    pub hidden: Option<(Var, Var)>,
    /// `[k, h or inputs]` and `[k]`.
    pub out: (Var, Var),
}

impl HeadVars {
    /// A head for `target` (none for a job without one) reading `positions` hidden states:
    /// the output layer small and random (the paper's start; a fit replaces it), the hidden
    /// layer random directions of unit scale per input (a fit rescales them to the inputs).
    pub fn random(
        model: &BaseModel,
        target: &Target,
        positions: usize,
        hidden: usize,
        seed: u64,
    ) -> Result<Option<Self>> {
        let k = match target {
            Target::Regression { .. } => 1,
            Target::Classification { labels } => labels.len(),
            _ => return Ok(None),
        };
        let inputs = positions * model.config().hidden_size;
        let device = model.device();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut uniform = |n: usize, a: f32| -> Vec<f32> {
            (0..n)
                .map(|_| rand::Rng::random_range(&mut rng, -a..a))
                .collect()
        };
        let width = if hidden > 0 { hidden } else { inputs };
        let out = (
            Var::from_vec(uniform(k * width, 0.01), (k, width), device)?,
            Var::zeros(k, DType::F32, device)?,
        );
        let hidden = match hidden {
            0 => None,
            h => {
                let a = (3.0 / inputs as f32).sqrt();
                Some((
                    Var::from_vec(uniform(h * inputs, a), (h, inputs), device)?,
                    Var::zeros(h, DType::F32, device)?,
                ))
            }
        };
        Ok(Some(Self { hidden, out }))
    }

    /// The learned parameters: the output layer, then the hidden layer if any.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.out.0.clone(), self.out.1.clone()];
        if let Some((w, b)) = &self.hidden {
            v.extend([w.clone(), b.clone()]);
        }
        v
    }

    /// Outputs `[n, k]` for inputs `[n, inputs]` (differentiable: tanh and matmuls only).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = &self.out;
        Ok(head_output(
            &self.hidden_of(x)?,
            w.as_tensor(),
            b.as_tensor(),
        )?)
    }

    fn hidden_of(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = self
            .hidden
            .as_ref()
            .map(|(w, b)| (w.as_tensor(), b.as_tensor()));
        Ok(head_hidden(x, hidden)?)
    }

    /// Rescales the hidden layer (as `random` made it) to inputs like `x` (rows of
    /// features), once, before the first fit: each unit's
    /// pre-activation becomes its random direction over the standardised inputs, about
    /// unit-variance, so tanh neither saturates on the few very large coordinates final
    /// hidden states have nor stays linear.
    pub fn fit_hidden_to(&self, x: &[Vec<f64>]) -> Result<()> {
        let Some((w, b)) = &self.hidden else {
            return Ok(());
        };
        let (n, d) = (x.len().max(1) as f64, x.first().map_or(0, |r| r.len()));
        let mut mean = vec![0.0; d];
        let mut sq = vec![0.0; d];
        for r in x {
            for j in 0..d {
                mean[j] += r[j] / n;
                sq[j] += r[j] * r[j] / n;
            }
        }
        let sd: Vec<f64> = (0..d)
            .map(|j| (sq[j] - mean[j] * mean[j]).max(0.0).sqrt())
            .collect();
        // The directions are uniform in ±sqrt(3 / d), variance 1/d each: over standardised
        // inputs (variance 1) a unit's pre-activation then has variance about 1.
        let dirs: Vec<Vec<f32>> = w.as_tensor().to_vec2()?;
        let (rows, bias): (Vec<Vec<f32>>, Vec<f32>) = dirs
            .iter()
            .map(|r| {
                // An input constant over the training set tells nothing: weight 0, so an
                // input that differs there later cannot blow a unit up.
                let row: Vec<f64> = (0..d)
                    .map(|j| {
                        if sd[j] > 1e-6 {
                            r[j] as f64 / sd[j]
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let b = -(0..d).map(|j| row[j] * mean[j]).sum::<f64>();
                (row.iter().map(|v| *v as f32).collect(), b as f32)
            })
            .unzip();
        let h = rows.len();
        w.set(&Tensor::from_vec(
            rows.into_iter().flatten().collect::<Vec<_>>(),
            (h, d),
            w.device(),
        )?)?;
        b.set(&Tensor::from_vec(bias, h, b.device())?)?;
        Ok(())
    }

    /// What the output layer reads for feature rows `x`: `x` itself, or the hidden units'
    /// activations (the closed-form fits of the output layer solve on these).
    pub fn output_inputs(&self, x: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        let Some((w, _)) = &self.hidden else {
            return Ok(x.to_vec());
        };
        let d = x.first().map_or(0, |r| r.len());
        let rows: Vec<f32> = x.iter().flatten().map(|v| *v as f32).collect();
        let input = Tensor::from_vec(rows, (x.len(), d), w.device())?;
        Ok(self.hidden_of(&input)?.to_dtype(DType::F64)?.to_vec2()?)
    }

    /// The head as a bundle carries it (copies: training may go on).
    pub fn to_head(&self, spec: &HeadSpec, positions: usize) -> Result<Head> {
        let copy = |(w, b): &(Var, Var)| -> Result<(Tensor, Tensor)> {
            Ok((w.as_tensor().copy()?, b.as_tensor().copy()?))
        };
        let (weight, bias) = copy(&self.out)?;
        Ok(Head {
            spec: spec.clone(),
            positions,
            hidden: self.hidden.as_ref().map(copy).transpose()?,
            weight,
            bias,
        })
    }
}
