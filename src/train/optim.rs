//! AdamW (decoupled weight decay) whose state can be saved and restored, so a training
//! job resumed from a checkpoint continues exactly where it stopped. (candle-nn's AdamW
//! keeps its moments private.)

use anyhow::{ensure, Result};
use candle_core::{Tensor, Var};

pub struct AdamW {
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    t: usize,
    pub lr: f64,
    /// Per parameter: its learning rate is `lr * scale` (e.g. a head's own rate).
    lr_scale: Vec<f64>,
    weight_decay: f64,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl AdamW {
    pub fn new(params: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        let m = params
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<_>>()?;
        let v = params
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            lr_scale: vec![1.0; params.len()],
            params,
            m,
            v,
            t: 0,
            lr,
            weight_decay,
        })
    }

    /// Scales parameter `i`'s learning rate by `scales[i]`.
    pub fn set_lr_scales(&mut self, scales: Vec<f64>) -> Result<()> {
        ensure!(
            scales.len() == self.params.len(),
            "{} learning-rate scales for {} parameters",
            scales.len(),
            self.params.len()
        );
        self.lr_scale = scales;
        Ok(())
    }

    pub fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        ensure!(
            grads.len() == self.params.len(),
            "{} gradients for {} parameters",
            grads.len(),
            self.params.len()
        );
        self.t += 1;
        let (c1, c2) = (
            1.0 - BETA1.powi(self.t as i32),
            1.0 - BETA2.powi(self.t as i32),
        );
        for (i, g) in grads.iter().enumerate().take(self.params.len()) {
            self.m[i] = ((&self.m[i] * BETA1)? + (g * (1.0 - BETA1))?)?;
            self.v[i] = ((&self.v[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + EPS)?)?;
            let lr = self.lr * self.lr_scale[i];
            let p = self.params[i].as_tensor();
            let decayed = (p * (1.0 - lr * self.weight_decay))?;
            self.params[i].set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// `(steps taken, first moments, second moments)`.
    pub fn state(&self) -> (usize, &[Tensor], &[Tensor]) {
        (self.t, &self.m, &self.v)
    }

    pub fn restore(&mut self, t: usize, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        ensure!(
            m.len() == self.params.len() && v.len() == self.params.len(),
            "optimizer state does not match the parameters"
        );
        self.t = t;
        self.m = m;
        self.v = v;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        let p = Var::from_vec(vec![1.0f32, -2.0, 3.0], 3, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![p.clone()], 0.1, 0.0).unwrap();
        let g = Tensor::new(&[0.5f32, -4.0, 0.0], &Device::Cpu).unwrap();
        opt.step(&[g]).unwrap();
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        // Bias-corrected Adam's first update is lr * sign(g) (0 where g = 0).
        assert!(
            (got[0] - 0.9).abs() < 1e-5
                && (got[1] + 1.9).abs() < 1e-5
                && (got[2] - 3.0).abs() < 1e-5,
            "{got:?}"
        );
    }

    #[test]
    fn restored_state_continues_identically() {
        let run = |split: bool| {
            let p = Var::from_vec(vec![1.0f32, -1.0], 2, &Device::Cpu).unwrap();
            let mut opt = AdamW::new(vec![p.clone()], 0.05, 0.01).unwrap();
            let grad = |k: f32| Tensor::new(&[k, -2.0 * k], &Device::Cpu).unwrap();
            opt.step(&[grad(1.0)]).unwrap();
            if split {
                let (t, m, v) = opt.state();
                let (m, v) = (m.to_vec(), v.to_vec());
                let mut fresh = AdamW::new(vec![p.clone()], 0.05, 0.01).unwrap();
                fresh.restore(t, m, v).unwrap();
                opt = fresh;
            }
            opt.step(&[grad(0.3)]).unwrap();
            p.as_tensor().to_vec1::<f32>().unwrap()
        };
        assert_eq!(run(false), run(true));
    }
}
