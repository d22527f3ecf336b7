//! Device selection: `cpu`, or `cuda:N` when built with the `cuda` feature. The only place that
//! names a device; the rest of the runtime works on whatever `Device` it is given.

use candle_core::Device;

use crate::{Error, Result};

/// Parses `cpu` or `cuda:N` (`cuda` alone means `cuda:0`).
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec {
        "cuda" => Some(0),
        _ => spec
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    let Some(ordinal) = ordinal else {
        return Err(Error::Device(format!(
            "`{spec}` is not a device: use `cpu` or `cuda:N`"
        )));
    };
    cuda_device(spec, ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(spec: &str, ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Device(format!(
            "`{spec}` cannot be opened: {e} (is a GPU visible to this process, with an NVIDIA driver >= 580 for CUDA 13?)"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(spec: &str, _ordinal: usize) -> Result<Device> {
    Err(Error::Device(format!(
        "`{spec}`: this binary was built without CUDA; rebuild with `--features cuda` (scripts/cuda-build.sh)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("tpu:0").unwrap_err().to_string();
        assert!(err.contains("tpu:0"), "{err}");
        assert!(parse_device("cuda:x").is_err());
        #[cfg(not(feature = "cuda"))]
        {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
