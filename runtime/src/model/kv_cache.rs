//! The KV cache of one sequence.
//!
//! Two stores: on the CPU forward path ([`super::host`]) keys and values are plain `f32`
//! buffers per layer (or IEEE half-precision bits, when the model's KV dtype is `F16`: half
//! the memory the attention reads per cached token), token-major `(len, kv_heads * head_dim)`,
//! so appending a token is one copy of its projection and the buffers grow by doubling
//! (amortized, never per token). On
//! other devices they are tensors `(kv_heads, capacity, head_dim)`, written in place and grown
//! by doubling, so appending a token never copies the whole history either.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Cached keys and values of one sequence.
#[derive(Debug)]
pub struct KvCache {
    store: Store,
    len: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

#[derive(Debug)]
enum Store {
    /// Per layer `(keys, values)`, each `len * kv_heads * head_dim` f32, token-major.
    Host(Vec<(Vec<f32>, Vec<f32>)>),
    /// As `Host`, in IEEE half-precision bits (rounded to nearest even when appended).
    HostF16(Vec<(Vec<u16>, Vec<u16>)>),
    /// Per layer `(keys, values)` tensors `(kv_heads, capacity, head_dim)`.
    Device {
        layers: Vec<Option<(Tensor, Tensor)>>,
        capacity: usize,
    },
}

/// One layer of a host store, borrowed: keys and values written so far, token-major.
#[derive(Clone, Copy)]
pub(crate) enum HostLayer<'a> {
    F32(&'a [f32], &'a [f32]),
    /// IEEE half-precision bits.
    F16(&'a [u16], &'a [u16]),
}

/// First allocation, in tokens.
const INITIAL_CAPACITY: usize = 64;

impl KvCache {
    /// A cache in tensors of `dtype` on `device`, or (`host`) in buffers for the CPU forward
    /// path: half-precision ones when `dtype` is `F16`, else `f32`.
    pub(crate) fn new(
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: Device,
        host: bool,
    ) -> Self {
        let host_dtype = if dtype == DType::F16 {
            DType::F16
        } else {
            DType::F32
        };
        let store = if host && host_dtype == DType::F16 {
            Store::HostF16((0..n_layers).map(|_| (Vec::new(), Vec::new())).collect())
        } else if host {
            Store::Host((0..n_layers).map(|_| (Vec::new(), Vec::new())).collect())
        } else {
            Store::Device {
                layers: (0..n_layers).map(|_| None).collect(),
                capacity: 0,
            }
        };
        Self {
            store,
            len: 0,
            kv_heads,
            head_dim,
            dtype: if host { host_dtype } else { dtype },
            device,
        }
    }

    /// Tokens in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated for this sequence.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Host(layers) => layers
                .iter()
                .map(|(k, v)| (k.capacity() + v.capacity()) * std::mem::size_of::<f32>())
                .sum(),
            Store::HostF16(layers) => layers
                .iter()
                .map(|(k, v)| (k.capacity() + v.capacity()) * std::mem::size_of::<u16>())
                .sum(),
            Store::Device { layers, capacity } => {
                let live = layers.iter().filter(|l| l.is_some()).count();
                2 * live * capacity * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
            }
        }
    }

    /// Forgets everything (keeps no memory).
    pub fn clear(&mut self) {
        match &mut self.store {
            Store::Host(layers) => layers.iter_mut().for_each(|(k, v)| {
                *k = Vec::new();
                *v = Vec::new();
            }),
            Store::HostF16(layers) => layers.iter_mut().for_each(|(k, v)| {
                *k = Vec::new();
                *v = Vec::new();
            }),
            Store::Device { layers, capacity } => {
                layers.iter_mut().for_each(|l| *l = None);
                *capacity = 0;
            }
        }
        self.len = 0;
    }

    /// Makes room for `extra` more tokens in every layer.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.len + extra;
        let width = self.kv_heads * self.head_dim;
        let (layers, capacity) = match &mut self.store {
            Store::Host(layers) => {
                for (k, v) in layers.iter_mut() {
                    // `Vec::reserve` at least doubles, so growth stays amortized.
                    k.reserve((need * width).saturating_sub(k.len()));
                    v.reserve((need * width).saturating_sub(v.len()));
                }
                return Ok(());
            }
            Store::HostF16(layers) => {
                for (k, v) in layers.iter_mut() {
                    k.reserve((need * width).saturating_sub(k.len()));
                    v.reserve((need * width).saturating_sub(v.len()));
                }
                return Ok(());
            }
            Store::Device { layers, capacity } => (layers, capacity),
        };
        if need <= *capacity {
            return Ok(());
        }
        let mut new_capacity = (*capacity).max(INITIAL_CAPACITY);
        while new_capacity < need {
            new_capacity *= 2;
        }
        for layer in layers.iter_mut() {
            let shape = (self.kv_heads, new_capacity, self.head_dim);
            let k = Tensor::zeros(shape, self.dtype, &self.device)?;
            let v = Tensor::zeros(shape, self.dtype, &self.device)?;
            if let Some((old_k, old_v)) = layer.as_ref() {
                if self.len > 0 {
                    k.slice_set(&old_k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    v.slice_set(&old_v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
            }
            *layer = Some((k, v));
        }
        *capacity = new_capacity;
        Ok(())
    }

    /// Writes `(kv_heads, t, head_dim)` keys and values of layer `layer` at the current end and
    /// returns the whole history `(kv_heads, len + t, head_dim)` of that layer. The length
    /// advances once all layers are written ([`KvCache::advance`]). Device store only.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        let Store::Device { layers, .. } = &self.store else {
            return Err(Error::Weights(
                "tensor append on a host KV cache (forward path mismatch)".into(),
            ));
        };
        let Some(Some((ck, cv))) = layers.get(layer) else {
            return Err(Error::Weights(format!("KV cache has no layer {layer}")));
        };
        ck.slice_set(&k.to_dtype(self.dtype)?, 1, self.len)?;
        cv.slice_set(&v.to_dtype(self.dtype)?, 1, self.len)?;
        Ok((
            ck.narrow(1, 0, self.len + t)?,
            cv.narrow(1, 0, self.len + t)?,
        ))
    }

    /// Host store: appends token-major keys and values `(t, kv_heads * head_dim)` to layer
    /// `layer` at the current end.
    pub(crate) fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let width = self.kv_heads * self.head_dim;
        let len = self.len;
        let no_layer = || Error::Weights(format!("KV cache has no layer {layer}"));
        match &mut self.store {
            Store::Host(layers) => {
                let (ck, cv) = layers.get_mut(layer).ok_or_else(no_layer)?;
                // A failed step may have left a partial append behind: drop it.
                ck.truncate(len * width);
                cv.truncate(len * width);
                ck.extend_from_slice(k);
                cv.extend_from_slice(v);
            }
            Store::HostF16(layers) => {
                let (ck, cv) = layers.get_mut(layer).ok_or_else(no_layer)?;
                ck.truncate(len * width);
                cv.truncate(len * width);
                // `half` rounds to nearest even, in hardware or not: the same bits everywhere.
                ck.extend(k.iter().map(|&x| half::f16::from_f32(x).to_bits()));
                cv.extend(v.iter().map(|&x| half::f16::from_f32(x).to_bits()));
            }
            Store::Device { .. } => {
                return Err(Error::Weights(
                    "host append on a device KV cache (forward path mismatch)".into(),
                ))
            }
        }
        Ok(())
    }

    /// Host store: keys and values of layer `layer` written so far, token-major.
    pub(crate) fn host_layer(&self, layer: usize) -> Result<HostLayer<'_>> {
        let no_layer = || Error::Weights(format!("KV cache has no layer {layer}"));
        match &self.store {
            Store::Host(layers) => layers
                .get(layer)
                .map(|(k, v)| HostLayer::F32(k, v))
                .ok_or_else(no_layer),
            Store::HostF16(layers) => layers
                .get(layer)
                .map(|(k, v)| HostLayer::F16(k, v))
                .ok_or_else(no_layer),
            Store::Device { .. } => Err(Error::Weights(
                "host read of a device KV cache (forward path mismatch)".into(),
            )),
        }
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// A new cache holding a copy of this one's first `len` tokens (all of them when `len`
    /// is larger), sized to them.
    pub fn copy_prefix(&self, len: usize) -> Result<KvCache> {
        let len = len.min(self.len);
        let width = self.kv_heads * self.head_dim;
        let store = match &self.store {
            Store::Host(layers) => Store::Host(
                layers
                    .iter()
                    .map(|(k, v)| (k[..len * width].to_vec(), v[..len * width].to_vec()))
                    .collect(),
            ),
            Store::HostF16(layers) => Store::HostF16(
                layers
                    .iter()
                    .map(|(k, v)| (k[..len * width].to_vec(), v[..len * width].to_vec()))
                    .collect(),
            ),
            Store::Device { layers, .. } => {
                let mut copy = Vec::with_capacity(layers.len());
                for layer in layers {
                    copy.push(match layer {
                        Some((k, v)) if len > 0 => Some((
                            k.narrow(1, 0, len)?.contiguous()?,
                            v.narrow(1, 0, len)?.contiguous()?,
                        )),
                        _ => None,
                    });
                }
                let capacity = if len > 0 { len } else { 0 };
                Store::Device {
                    layers: copy,
                    capacity,
                }
            }
        };
        Ok(KvCache {
            store,
            len,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }
}
