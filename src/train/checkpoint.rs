//! Everything a training run needs to continue after a crash, in one safetensors file
//! written by temp file + rename (so a checkpoint is either the old one or the new one).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Optimizer steps completed.
    pub step: usize,
    pub params: Vec<Tensor>,
    pub adam_t: usize,
    pub adam_m: Vec<Tensor>,
    pub adam_v: Vec<Tensor>,
    /// Best held-out loss so far, its step and its parameters.
    pub best: Option<(f64, usize, Vec<Tensor>)>,
    pub evals_without_gain: usize,
    /// The held-out evaluation before step 1 (reported in the published manifest).
    pub initial_eval: Option<serde_json::Value>,
}

impl Checkpoint {
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        let n = self.params.len();
        for i in 0..n {
            t.insert(format!("param.{i}"), self.params[i].clone());
            t.insert(format!("adam_m.{i}"), self.adam_m[i].clone());
            t.insert(format!("adam_v.{i}"), self.adam_v[i].clone());
        }
        let (best_loss, best_step) = match &self.best {
            Some((loss, step, params)) => {
                for (i, p) in params.iter().enumerate() {
                    t.insert(format!("best.{i}"), p.clone());
                }
                (*loss, *step as f64)
            }
            None => (f64::NAN, -1.0),
        };
        let meta = [
            self.step as f64,
            self.adam_t as f64,
            best_loss,
            best_step,
            self.evals_without_gain as f64,
            n as f64,
        ];
        t.insert("meta".into(), Tensor::new(&meta, &Device::Cpu)?);
        if let Some(e) = &self.initial_eval {
            t.insert(
                "initial_eval".into(),
                Tensor::new(serde_json::to_vec(e)?.as_slice(), &Device::Cpu)?,
            );
        }
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&t, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("publishing checkpoint {}", path.display()))
    }

    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut t = candle_core::safetensors::load(path, device)
            .with_context(|| format!("reading checkpoint {}", path.display()))?;
        let meta: Vec<f64> = t
            .remove("meta")
            .context("checkpoint has no meta")?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        let n = meta[5] as usize;
        let mut take = |k: String| {
            t.remove(&k)
                .with_context(|| format!("checkpoint lacks {k}"))
        };
        let params = (0..n)
            .map(|i| take(format!("param.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let adam_m = (0..n)
            .map(|i| take(format!("adam_m.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let adam_v = (0..n)
            .map(|i| take(format!("adam_v.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let best = if meta[3] >= 0.0 {
            Some((
                meta[2],
                meta[3] as usize,
                (0..n)
                    .map(|i| take(format!("best.{i}")))
                    .collect::<Result<Vec<_>>>()?,
            ))
        } else {
            None
        };
        // Absent from checkpoints written before it existed.
        let initial_eval = match t.remove("initial_eval") {
            Some(bytes) => Some(serde_json::from_slice(&bytes.to_vec1::<u8>()?)?),
            None => None,
        };
        Ok(Self {
            initial_eval,
            step: meta[0] as usize,
            params,
            adam_t: meta[1] as usize,
            adam_m,
            adam_v,
            best,
            evals_without_gain: meta[4] as usize,
        })
    }
}

impl Checkpoint {
    /// The checkpoint as bytes (a safetensors file), e.g. to keep it in the job store.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let path =
            std::env::temp_dir().join(format!("tagllm-ckpt-{}.safetensors", uuid::Uuid::new_v4()));
        self.save(&path)?;
        let bytes = std::fs::read(&path);
        let _ = std::fs::remove_file(&path);
        Ok(bytes?)
    }

    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let path =
            std::env::temp_dir().join(format!("tagllm-ckpt-{}.safetensors", uuid::Uuid::new_v4()));
        std::fs::write(&path, bytes)?;
        let c = Self::load(&path, device);
        let _ = std::fs::remove_file(&path);
        c
    }
}
