//! The KV cache of one sequence.
//!
//! Two stores: on the CPU forward path ([`super::host`]) keys and values are plain `f32`
//! buffers per layer (or IEEE half-precision bits, when the model's KV dtype is `F16`: half
//! the memory the attention reads per cached token). Values are token-major `(len, kv_heads *
//! head_dim)`; keys are in blocks of [`KEY_BLOCK`] tokens, each `(kv_heads, head_dim,
//! KEY_BLOCK)`, so the attention scores a block's keys with one vector lane per key and no
//! horizontal sums. The buffers grow by doubling (amortized, never per token). On
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
    /// Per layer, `f32`.
    Host(Vec<HostKv<f32>>),
    /// As `Host`, in IEEE half-precision bits (rounded to nearest even when appended).
    HostF16(Vec<HostKv<u16>>),
    /// Per layer `(keys, values)` tensors `(kv_heads, capacity, head_dim)`.
    Device {
        layers: Vec<Option<(Tensor, Tensor)>>,
        capacity: usize,
    },
}

/// Tokens per key block of a host store.
pub(crate) const KEY_BLOCK: usize = 16;

/// One layer of a host store: per KV head, its keys and values in one contiguous run each,
/// so a head's attention streams through memory.
#[derive(Debug)]
struct HostKv<T> {
    heads: Vec<HeadKv<T>>,
}

/// One KV head of one layer: keys in blocks of [`KEY_BLOCK`] tokens, each `(head_dim,
/// KEY_BLOCK)` (one vector lane per token; the slots of the last block past the length are
/// unspecified), values token-major `(tokens, head_dim)`.
#[derive(Debug, Default, Clone)]
pub(crate) struct HeadKv<T> {
    pub keys: Vec<T>,
    pub values: Vec<T>,
}

/// An element of a host store, converted from the projections' `f32`.
trait HostElem: Copy + Default {
    fn from_f32(x: f32) -> Self;
}

impl HostElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl HostElem for u16 {
    /// `half` rounds to nearest even, in hardware or not: the same bits everywhere.
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x).to_bits()
    }
}

impl<T: HostElem> HostKv<T> {
    fn new(kv_heads: usize) -> Self {
        Self {
            heads: (0..kv_heads).map(|_| HeadKv::default()).collect(),
        }
    }

    /// Room for `tokens` tokens of `head_dim` values per head.
    fn reserve(&mut self, tokens: usize, head_dim: usize) {
        let keys = tokens.div_ceil(KEY_BLOCK) * KEY_BLOCK * head_dim;
        for h in &mut self.heads {
            // `Vec::reserve` at least doubles, so growth stays amortized.
            h.keys.reserve(keys.saturating_sub(h.keys.len()));
            h.values
                .reserve((tokens * head_dim).saturating_sub(h.values.len()));
        }
    }

    /// Writes token-major `k` and `v` `(t, kv_heads * head_dim)` after the first `len`
    /// tokens (anything past them, such as a failed step's partial append, is dropped).
    fn append(&mut self, len: usize, head_dim: usize, k: &[f32], v: &[f32]) {
        let width = self.heads.len() * head_dim;
        let t = k.len() / width;
        for (h, head) in self.heads.iter_mut().enumerate() {
            head.values.truncate(len * head_dim);
            head.keys.resize(
                (len + t).div_ceil(KEY_BLOCK) * KEY_BLOCK * head_dim,
                T::default(),
            );
            for (i, (kr, vr)) in k.chunks_exact(width).zip(v.chunks_exact(width)).enumerate() {
                let (kr, vr) = (
                    &kr[h * head_dim..][..head_dim],
                    &vr[h * head_dim..][..head_dim],
                );
                head.values.extend(vr.iter().map(|&x| T::from_f32(x)));
                let (block, slot) = ((len + i) / KEY_BLOCK, (len + i) % KEY_BLOCK);
                let at = block * KEY_BLOCK * head_dim + slot;
                for (d, &x) in kr.iter().enumerate() {
                    head.keys[at + d * KEY_BLOCK] = T::from_f32(x);
                }
            }
        }
    }

    /// The first `len` tokens' keys and values, sized to them.
    fn prefix(&self, len: usize, head_dim: usize) -> Self {
        let heads = self
            .heads
            .iter()
            .map(|h| HeadKv {
                keys: h.keys[..len.div_ceil(KEY_BLOCK) * KEY_BLOCK * head_dim].to_vec(),
                values: h.values[..len * head_dim].to_vec(),
            })
            .collect();
        Self { heads }
    }

    fn bytes(&self) -> usize {
        let elems: usize = self
            .heads
            .iter()
            .map(|h| h.keys.capacity() + h.values.capacity())
            .sum();
        elems * std::mem::size_of::<T>()
    }
}

/// One layer of a host store, borrowed: per KV head, keys in blocks and values token-major
/// (see [`HeadKv`]).
#[derive(Clone, Copy)]
pub(crate) enum HostLayer<'a> {
    F32(&'a [HeadKv<f32>]),
    /// IEEE half-precision bits.
    F16(&'a [HeadKv<u16>]),
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
            Store::HostF16((0..n_layers).map(|_| HostKv::new(kv_heads)).collect())
        } else if host {
            Store::Host((0..n_layers).map(|_| HostKv::new(kv_heads)).collect())
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
            Store::Host(layers) => layers.iter().map(HostKv::bytes).sum(),
            Store::HostF16(layers) => layers.iter().map(HostKv::bytes).sum(),
            Store::Device { layers, capacity } => {
                let live = layers.iter().filter(|l| l.is_some()).count();
                2 * live * capacity * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
            }
        }
    }

    /// Forgets everything (keeps no memory).
    pub fn clear(&mut self) {
        let kv_heads = self.kv_heads;
        match &mut self.store {
            Store::Host(layers) => layers.iter_mut().for_each(|l| *l = HostKv::new(kv_heads)),
            Store::HostF16(layers) => layers.iter_mut().for_each(|l| *l = HostKv::new(kv_heads)),
            Store::Device { layers, capacity } => {
                layers.iter_mut().for_each(|l| *l = None);
                *capacity = 0;
            }
        }
        self.len = 0;
    }

    /// Makes room for `extra` more tokens in every layer.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let (need, hd) = (self.len + extra, self.head_dim);
        let (layers, capacity) = match &mut self.store {
            Store::Host(layers) => {
                layers.iter_mut().for_each(|l| l.reserve(need, hd));
                return Ok(());
            }
            Store::HostF16(layers) => {
                layers.iter_mut().for_each(|l| l.reserve(need, hd));
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
    /// `layer` at the current end (a failed step's partial append is dropped first).
    pub(crate) fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (hd, len) = (self.head_dim, self.len);
        let no_layer = || Error::Weights(format!("KV cache has no layer {layer}"));
        match &mut self.store {
            Store::Host(layers) => {
                layers
                    .get_mut(layer)
                    .ok_or_else(no_layer)?
                    .append(len, hd, k, v);
            }
            Store::HostF16(layers) => {
                layers
                    .get_mut(layer)
                    .ok_or_else(no_layer)?
                    .append(len, hd, k, v);
            }
            Store::Device { .. } => {
                return Err(Error::Weights(
                    "host append on a device KV cache (forward path mismatch)".into(),
                ))
            }
        }
        Ok(())
    }

    /// Host store: keys (in blocks) and values (token-major) of layer `layer` written so far.
    pub(crate) fn host_layer(&self, layer: usize) -> Result<HostLayer<'_>> {
        let no_layer = || Error::Weights(format!("KV cache has no layer {layer}"));
        match &self.store {
            Store::Host(layers) => layers
                .get(layer)
                .map(|l| HostLayer::F32(&l.heads))
                .ok_or_else(no_layer),
            Store::HostF16(layers) => layers
                .get(layer)
                .map(|l| HostLayer::F16(&l.heads))
                .ok_or_else(no_layer),
            Store::Device { .. } => Err(Error::Weights(
                "host read of a device KV cache (forward path mismatch)".into(),
            )),
        }
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets every token after the first `len` (nothing when it holds fewer): a verified
    /// draft's rejected positions. Their slots are written over by the next append.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A new cache holding a copy of this one's first `len` tokens (all of them when `len`
    /// is larger), sized to them.
    pub fn copy_prefix(&self, len: usize) -> Result<KvCache> {
        let (len, hd) = (len.min(self.len), self.head_dim);
        let store = match &self.store {
            Store::Host(layers) => Store::Host(layers.iter().map(|l| l.prefix(len, hd)).collect()),
            Store::HostF16(layers) => {
                Store::HostF16(layers.iter().map(|l| l.prefix(len, hd)).collect())
            }
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
