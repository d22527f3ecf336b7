//! Rotary position embeddings: the frequencies of each rotated pair, their context-extension
//! scaling, and the `(context, head_dim / 2)` cos/sin tables the forward passes index by
//! position. It does not rotate anything (`llama` and `host` do, in their own layouts).
//!
//! Two scalings occur in Llama-family files and they compose:
//! * linear ("position interpolation"): every position is divided by a factor. GGUF:
//!   `llama.rope.scaling.type = "linear"` with `llama.rope.scaling.factor` (older files:
//!   `llama.rope.scale_linear`); config.json: `rope_scaling = {"rope_type": "linear", "factor"}`.
//! * per-pair frequency divisors: pair `i` turns at `theta^(-2i/d) / divisor[i]`. Llama 3.1+
//!   derives them from `rope_scaling = {"rope_type": "llama3", factor, low_freq_factor,
//!   high_freq_factor, original_max_position_embeddings}`; a GGUF converted from it stores the
//!   divisors themselves as the tensor `rope_freqs.weight`.

use candle_core::{DType, Device, Tensor};

use super::LlamaConfig;
use crate::{Error, Result};

/// How a model's RoPE frequencies are scaled (none by default).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RopeScaling {
    /// Linear scaling: positions are divided by this factor.
    pub linear: Option<f32>,
    /// One frequency divisor per rotated pair (`head_dim / 2` of them).
    pub freq_divisors: Option<Vec<f32>>,
}

/// The parameters of Llama 3.1's frequency-dependent scaling (config.json `rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_context: usize,
}

impl Llama3Scaling {
    /// The divisor of each rotated pair: wavelengths shorter than `original / high_freq_factor`
    /// keep their frequency, those longer than `original / low_freq_factor` are divided by
    /// `factor`, and the band between blends the two linearly in `original / wavelength`.
    pub fn freq_divisors(&self, head_dim: usize, theta: f32) -> Result<Vec<f32>> {
        if self.factor <= 0.0
            || self.original_context == 0
            || self.high_freq_factor <= self.low_freq_factor
            || self.low_freq_factor <= 0.0
        {
            return Err(Error::Config(format!(
                "invalid llama3 rope_scaling {self:?}"
            )));
        }
        let original = self.original_context as f32;
        let low_freq_wavelen = original / self.low_freq_factor;
        let high_freq_wavelen = original / self.high_freq_factor;
        Ok(inv_freqs(head_dim, theta)
            .into_iter()
            .map(|freq| {
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_freq_wavelen {
                    1.0
                } else if wavelen > low_freq_wavelen {
                    self.factor
                } else {
                    let smooth = (original / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                }
            })
            .collect())
    }
}

impl RopeScaling {
    /// Reads config.json's `rope_scaling` (absent or null: none). Types other than `default`,
    /// `linear` and `llama3` are refused, naming the type.
    pub fn from_hf(value: Option<&serde_json::Value>, head_dim: usize, theta: f32) -> Result<Self> {
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return Ok(Self::default());
        };
        let kind = value
            .get("rope_type")
            .or_else(|| value.get("type"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| Error::Config(format!("rope_scaling {value} has no rope_type")))?;
        let num = |key: &str| -> Result<f64> {
            value.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
                Error::Config(format!(
                    "rope_scaling of type `{kind}` lacks a numeric `{key}`"
                ))
            })
        };
        match kind {
            "default" => Ok(Self::default()),
            "linear" => Ok(Self {
                linear: Some(positive_factor(num("factor")? as f32)?),
                freq_divisors: None,
            }),
            "llama3" => {
                let params = Llama3Scaling {
                    factor: num("factor")? as f32,
                    low_freq_factor: num("low_freq_factor")? as f32,
                    high_freq_factor: num("high_freq_factor")? as f32,
                    original_context: num("original_max_position_embeddings")? as usize,
                };
                Ok(Self {
                    linear: None,
                    freq_divisors: Some(params.freq_divisors(head_dim, theta)?),
                })
            }
            other => Err(Error::Config(format!(
                "rope_scaling type `{other}` is not supported (supported: default, linear, llama3)"
            ))),
        }
    }

    /// From GGUF metadata: `scaling_type` (`llama.rope.scaling.type`), the linear factor
    /// (`llama.rope.scaling.factor` or the older `llama.rope.scale_linear`) and the
    /// `rope_freqs.weight` values. Scaling types other than `none` and `linear` are refused.
    pub fn from_gguf(
        scaling_type: Option<&str>,
        factor: Option<f32>,
        freq_divisors: Option<Vec<f32>>,
        head_dim: usize,
    ) -> Result<Self> {
        let linear = match scaling_type {
            None | Some("none") => factor.filter(|&f| f != 1.0),
            Some("linear") => Some(factor.ok_or_else(|| {
                Error::Config("rope scaling type `linear` without llama.rope.scaling.factor".into())
            })?),
            Some(other) => {
                return Err(Error::Config(format!(
                    "rope scaling type `{other}` is not supported (supported: none, linear, and \
                     rope_freqs.weight)"
                )))
            }
        };
        let linear = linear.map(positive_factor).transpose()?;
        if let Some(divisors) = &freq_divisors {
            if divisors.len() != head_dim / 2 {
                return Err(Error::Weights(format!(
                    "rope_freqs.weight has {} values; head dim {head_dim} rotates {} pairs",
                    divisors.len(),
                    head_dim / 2
                )));
            }
            if let Some(bad) = divisors.iter().find(|d| !(d.is_finite() && **d > 0.0)) {
                return Err(Error::Weights(format!(
                    "rope_freqs.weight holds the divisor {bad}"
                )));
            }
        }
        Ok(Self {
            linear,
            freq_divisors,
        })
    }
}

fn positive_factor(f: f32) -> Result<f32> {
    if f.is_finite() && f > 0.0 {
        Ok(f)
    } else {
        Err(Error::Config(format!(
            "rope scaling factor {f} is not positive"
        )))
    }
}

/// Unscaled frequencies `theta^(-2i/d)` of the `head_dim / 2` pairs.
fn inv_freqs(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// The scaled frequency of each pair.
pub(crate) fn frequencies(cfg: &LlamaConfig) -> Vec<f32> {
    let scaling = &cfg.rope_scaling;
    let mut freqs = inv_freqs(cfg.head_dim, cfg.rope_theta);
    if let Some(divisors) = &scaling.freq_divisors {
        freqs.iter_mut().zip(divisors).for_each(|(f, d)| *f /= d);
    }
    if let Some(factor) = scaling.linear {
        freqs.iter_mut().for_each(|f| *f /= factor);
    }
    freqs
}

/// RoPE tables `(context, head_dim / 2)` for positions `0..context`.
pub(crate) fn rope_tables(cfg: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq = Tensor::from_vec(frequencies(cfg), (1, half), device)?;
    let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.context_length, 1))?;
    let freqs = positions.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1's published scaling parameters.
    const LLAMA31: Llama3Scaling = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context: 8192,
    };

    fn config(scaling: RopeScaling) -> LlamaConfig {
        LlamaConfig {
            architecture: crate::model::Architecture::Llama,
            vocab_size: 10,
            hidden_size: 128,
            n_layers: 1,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 128,
            ffn_size: 8,
            rope_theta: 500_000.0,
            rms_eps: 1e-5,
            context_length: 64,
            rope_interleaved: true,
            rope_scaling: scaling,
            sliding_window: None,
        }
    }

    /// Llama 3.1 8B (head dim 128, theta 5e5): the 64 pairs split into 29 fast ones kept as
    /// they are, 29 slow ones divided by 8, and 6 blended (wavelengths between 2048 and 8192).
    #[test]
    fn llama3_divisors_split_the_band_at_the_published_wavelengths() {
        let d = LLAMA31.freq_divisors(128, 500_000.0).unwrap();
        assert_eq!(d.len(), 64);
        let kept = d.iter().filter(|&&x| x == 1.0).count();
        let slowed = d.iter().filter(|&&x| x == 8.0).count();
        assert_eq!((kept, slowed), (29, 29), "{d:?}");
        let freqs = inv_freqs(128, 500_000.0);
        for (i, (&div, &f)) in d.iter().zip(&freqs).enumerate() {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let expected = if wavelen < 2048.0 {
                1.0
            } else if wavelen > 8192.0 {
                8.0
            } else {
                assert!(div > 1.0 && div < 8.0, "pair {i}: {div}");
                continue;
            };
            assert_eq!(div, expected, "pair {i} (wavelength {wavelen})");
        }
        // The blend is monotone: slower pairs are divided more.
        assert!(d.windows(2).all(|w| w[0] <= w[1]), "{d:?}");
    }

    #[test]
    fn linear_scaling_divides_positions() {
        let dev = Device::Cpu;
        let (cos, sin) = rope_tables(&config(RopeScaling::default()), &dev).unwrap();
        let scaled = config(RopeScaling {
            linear: Some(4.0),
            freq_divisors: None,
        });
        let (cos4, sin4) = rope_tables(&scaled, &dev).unwrap();
        let (cos, sin) = (cos.to_vec2::<f32>().unwrap(), sin.to_vec2::<f32>().unwrap());
        let (cos4, sin4) = (
            cos4.to_vec2::<f32>().unwrap(),
            sin4.to_vec2::<f32>().unwrap(),
        );
        for p in 0..16 {
            for i in 0..64 {
                assert!((cos4[4 * p][i] - cos[p][i]).abs() < 1e-4, "cos {p} {i}");
                assert!((sin4[4 * p][i] - sin[p][i]).abs() < 1e-4, "sin {p} {i}");
            }
        }
        assert!((cos4[2][0] - cos[2][0]).abs() > 0.1);
    }

    #[test]
    fn config_json_scalings_are_read_and_unknown_ones_refused() {
        let llama3 = serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        });
        let s = RopeScaling::from_hf(Some(&llama3), 128, 500_000.0).unwrap();
        assert_eq!(
            s.freq_divisors,
            Some(LLAMA31.freq_divisors(128, 500_000.0).unwrap())
        );
        let linear = serde_json::json!({"type": "linear", "factor": 2.0});
        let s = RopeScaling::from_hf(Some(&linear), 128, 1e4).unwrap();
        assert_eq!(s.linear, Some(2.0));
        assert_eq!(
            RopeScaling::from_hf(Some(&serde_json::Value::Null), 128, 1e4).unwrap(),
            RopeScaling::default()
        );
        let yarn = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let err = RopeScaling::from_hf(Some(&yarn), 128, 1e4).unwrap_err();
        assert!(err.to_string().contains("`yarn`"), "{err}");
        let err = RopeScaling::from_gguf(Some("yarn"), Some(4.0), None, 128).unwrap_err();
        assert!(err.to_string().contains("`yarn`"), "{err}");
        let err = RopeScaling::from_gguf(None, None, Some(vec![1.0; 3]), 128).unwrap_err();
        assert!(err.to_string().contains("rope_freqs"), "{err}");
    }

    #[test]
    fn frequency_divisors_apply_per_pair() {
        let divisors: Vec<f32> = (0..64).map(|i| 1.0 + i as f32).collect();
        let cfg = config(RopeScaling {
            linear: Some(2.0),
            freq_divisors: Some(divisors.clone()),
        });
        let base = inv_freqs(128, 500_000.0);
        for ((f, b), d) in frequencies(&cfg).iter().zip(&base).zip(&divisors) {
            assert!((f - b / d / 2.0).abs() <= 1e-6 * b, "{f} vs {b}/{d}/2");
        }
    }
}
