//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use tagllm::model::BaseModel;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fixtures computed by an independent implementation (HF transformers), see its README.
pub fn reference(name: &str) -> PathBuf {
    root().join("tests/reference").join(name)
}

pub fn reference_json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(reference(name)).unwrap()).unwrap()
}

/// A float32 `.npy` fixture as a tensor.
pub fn npy(name: &str) -> Tensor {
    let bytes = std::fs::read(reference(name)).unwrap();
    let arr = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape: Vec<usize> = arr.shape().iter().map(|&d| d as usize).collect();
    let data: Vec<f32> = arr.into_vec().unwrap();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// The largest absolute value in `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_abs(&(a - b).unwrap())
}

/// The default model, loaded once per test binary. The README's test command sets it up.
pub fn default_model() -> &'static BaseModel {
    static MODEL: OnceLock<BaseModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = root().join(tagllm::model::DEFAULT_MODEL_PATH);
        assert!(
            path.exists(),
            "{} is missing: run scripts/setup-model.sh",
            path.display()
        );
        BaseModel::load(&path, &Device::Cpu).unwrap()
    })
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub mod openapi;
pub mod server;
