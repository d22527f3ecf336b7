//! The KV cache of one sequence: per layer, keys and values laid out `(kv_heads, capacity,
//! head_dim)`, written in place and grown by doubling, so appending a token never copies the
//! whole history.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// Cached keys and values of one sequence.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

/// First allocation, in tokens.
const INITIAL_CAPACITY: usize = 64;

impl KvCache {
    pub(crate) fn new(
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: Device,
    ) -> Self {
        Self {
            layers: (0..n_layers).map(|_| None).collect(),
            len: 0,
            capacity: 0,
            kv_heads,
            head_dim,
            dtype,
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
        let live = self.layers.iter().filter(|l| l.is_some()).count();
        2 * live * self.capacity * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Forgets everything (keeps no memory).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
        self.capacity = 0;
    }

    /// Makes room for `extra` more tokens in every layer.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.len + extra;
        if need <= self.capacity {
            return Ok(());
        }
        let mut capacity = self.capacity.max(INITIAL_CAPACITY);
        while capacity < need {
            capacity *= 2;
        }
        for layer in self.layers.iter_mut() {
            let k = Tensor::zeros(
                (self.kv_heads, capacity, self.head_dim),
                self.dtype,
                &self.device,
            )?;
            let v = Tensor::zeros(
                (self.kv_heads, capacity, self.head_dim),
                self.dtype,
                &self.device,
            )?;
            if let Some((old_k, old_v)) = layer.as_ref() {
                if self.len > 0 {
                    k.slice_set(&old_k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    v.slice_set(&old_v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
            }
            *layer = Some((k, v));
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Writes `(kv_heads, t, head_dim)` keys and values of layer `layer` at the current end and
    /// returns the whole history `(kv_heads, len + t, head_dim)` of that layer. The length
    /// advances once all layers are written ([`KvCache::advance`]).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        let Some(Some((ck, cv))) = self.layers.get(layer) else {
            return Err(crate::Error::Weights(format!(
                "KV cache has no layer {layer}"
            )));
        };
        ck.slice_set(&k.to_dtype(self.dtype)?, 1, self.len)?;
        cv.slice_set(&v.to_dtype(self.dtype)?, 1, self.len)?;
        Ok((
            ck.narrow(1, 0, self.len + t)?,
            cv.narrow(1, 0, self.len + t)?,
        ))
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
