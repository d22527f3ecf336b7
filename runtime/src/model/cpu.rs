//! Which SIMD implementation Tollgate's CPU kernels run: detected once from the CPU, or forced
//! with `TOLLGATE_CPU_KERNELS=scalar|avx2|avx512` (a path the CPU lacks is refused when a model
//! loads, naming the missing features).
//!
//! Every kernel has a portable implementation that the SIMD ones agree with (bit for bit where
//! the arithmetic is the same), and each kernel takes the [`CpuKernels`] to run as an argument,
//! so the tests run every path this CPU has against the portable one whatever was selected.
//! This module owns the choice only; the kernels live in `q8`, `codes` and `host`.

use std::str::FromStr;
use std::sync::OnceLock;

use crate::{Error, Result};

/// The environment variable that forces a kernel path.
pub const KERNELS_ENV: &str = "TOLLGATE_CPU_KERNELS";

/// A family of CPU kernels, from the most portable to the widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuKernels {
    /// Portable Rust; what a CPU without AVX2 runs (the weight forms then keep candle's own
    /// quantized kernels where Tollgate's would only run their portable loops).
    Scalar,
    /// AVX2, FMA and F16C (x86-64 since Haswell / Zen 1).
    Avx2,
    /// AVX-512 F, BW, VL and VNNI on top of AVX2 (Ice Lake, Sapphire Rapids, Zen 4 and later).
    Avx512,
}

impl CpuKernels {
    /// Every path, narrowest first.
    pub const ALL: [CpuKernels; 3] = [Self::Scalar, Self::Avx2, Self::Avx512];

    /// The CPU features a path needs.
    fn needed(self) -> &'static [&'static str] {
        match self {
            Self::Scalar => &[],
            Self::Avx2 => &["avx2", "fma", "f16c"],
            Self::Avx512 => &[
                "avx2",
                "fma",
                "f16c",
                "avx512f",
                "avx512bw",
                "avx512vl",
                "avx512vnni",
            ],
        }
    }

    /// The CPU features a path needs that this CPU lacks (empty: it can run here).
    pub fn missing_features(self) -> Vec<&'static str> {
        self.needed()
            .iter()
            .copied()
            .filter(|f| !has_feature(f))
            .collect()
    }

    /// Whether this CPU can run the path (cheap: the feature checks are cached by std).
    pub fn is_available(self) -> bool {
        self.needed().iter().all(|f| has_feature(f))
    }

    /// The widest path this CPU runs.
    pub fn detected() -> Self {
        Self::ALL
            .into_iter()
            .rev()
            .find(|k| k.is_available())
            .unwrap_or(Self::Scalar)
    }

    /// Every path this CPU runs, narrowest first (the tests run each of them).
    pub fn available() -> Vec<Self> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The path the environment asks for ([`KERNELS_ENV`]), else the detected one; an unknown
    /// name or a path this CPU cannot run is an error naming the missing features.
    pub fn from_env() -> Result<Self> {
        let Ok(value) = std::env::var(KERNELS_ENV) else {
            return Ok(Self::detected());
        };
        if value.trim().is_empty() {
            return Ok(Self::detected());
        }
        let kernels: Self = value.parse()?;
        let missing = kernels.missing_features();
        if !missing.is_empty() {
            return Err(Error::Config(format!(
                "{KERNELS_ENV}={value}: this CPU lacks {} (it runs: {})",
                missing.join(", "),
                Self::available()
                    .iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(kernels)
    }

    /// The path the kernels run in this process: [`Self::from_env`], decided once. Model
    /// loading calls [`Self::from_env`] first and refuses a bad setting, so the fallback to the
    /// detected path only serves code that runs kernels without loading a model (unit tests).
    pub fn selected() -> Self {
        static SELECTED: OnceLock<CpuKernels> = OnceLock::new();
        *SELECTED.get_or_init(|| Self::from_env().unwrap_or_else(|_| Self::detected()))
    }

    /// Whether the path has AVX2, FMA and F16C (both SIMD paths do).
    pub(crate) fn has_avx2(self) -> bool {
        self >= Self::Avx2
    }
}

impl FromStr for CpuKernels {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "portable" => Ok(Self::Scalar),
            "avx2" => Ok(Self::Avx2),
            "avx512" | "avx-512" => Ok(Self::Avx512),
            other => Err(Error::Config(format!(
                "{KERNELS_ENV}: unknown kernel path `{other}` (valid: scalar, avx2, avx512)"
            ))),
        }
    }
}

impl std::fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn has_feature(name: &str) -> bool {
    match name {
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "f16c" => std::arch::is_x86_feature_detected!("f16c"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
        "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
        "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn has_feature(_name: &str) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        for k in CpuKernels::ALL {
            assert_eq!(k.to_string().parse::<CpuKernels>().ok(), Some(k));
        }
        let err = "sse9".parse::<CpuKernels>().unwrap_err().to_string();
        assert!(err.contains("sse9") && err.contains("avx512"), "{err}");
    }

    #[test]
    fn availability_is_ordered() {
        // Scalar always runs; a wider path runs only where the narrower ones do.
        let available = CpuKernels::available();
        assert_eq!(available.first(), Some(&CpuKernels::Scalar));
        assert_eq!(available.last(), Some(&CpuKernels::detected()));
        assert_eq!(available.len(), CpuKernels::detected() as usize + 1);
        println!("kernel paths on this CPU: {available:?}");
    }
}
