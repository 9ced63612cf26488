//! `--device cpu | cuda[:N]`, saying plainly when a CUDA device was asked of a CPU build.

use anyhow::{bail, Context, Result};
use candle_core::Device;

pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("bad device `{spec}`: expected cpu, cuda or cuda:N"))?,
        None => bail!("bad device `{spec}`: expected cpu, cuda or cuda:N"),
    };
    if !cfg!(feature = "cuda") {
        bail!("device `{spec}` needs a CUDA build: rebuild with `cargo build --release --features cuda`");
    }
    Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
}

pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => format!("cuda:{:?}", device.location()),
        Device::Metal(_) => "metal".to_string(),
    }
}
