//! One sequence's key/value cache for every decoder layer. Storage grows by doubling, so that
//! appending a token writes only that token and never copies the whole cache.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug)]
struct LayerCache {
    /// `[1, kv_heads, capacity, head_dim]`; the first `len` positions are valid.
    k: Tensor,
    v: Tensor,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    len: usize,
    capacity: usize,
    /// Positions to allocate at first use, when the final length is known in advance.
    reserved: usize,
}

/// Positions a new cache reserves at first use; it doubles from there as needed.
const INITIAL_CAPACITY: usize = 256;

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache that allocates room for `tokens` positions at once, so it never grows (and
    /// never copies) while staying within them.
    pub fn with_capacity(num_layers: usize, tokens: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| None).collect(), len: 0, capacity: 0, reserved: tokens }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cache's storage (capacity, not just the used part).
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes()).sum()
    }

    /// Appends `k`, `v` (`[1, kv_heads, n, head_dim]`) at layer `layer` and returns views of
    /// all cached keys and values. Call for every layer with the same `n`, then `advance(n)`.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let needed = self.len + n;
        if needed > self.capacity {
            let capacity = if needed <= self.reserved {
                self.reserved
            } else {
                needed.max(INITIAL_CAPACITY).next_power_of_two().max(self.capacity * 2)
            };
            self.grow(capacity, k.dims4()?, k.dtype(), k.device())?;
        }
        let slot = self.layers[layer].as_mut().expect("grow allocates every layer");
        slot.k.slice_set(&k.contiguous()?, 2, self.len)?;
        slot.v.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((slot.k.narrow(2, 0, needed)?, slot.v.narrow(2, 0, needed)?))
    }

    /// Marks `n` appended positions as valid; called once after all layers appended them.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    fn grow(&mut self, capacity: usize, dims: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<()> {
        let (b, heads, _, head_dim) = dims;
        for slot in self.layers.iter_mut() {
            let k = Tensor::zeros((b, heads, capacity, head_dim), dtype, device)?;
            let v = Tensor::zeros((b, heads, capacity, head_dim), dtype, device)?;
            if let Some(old) = slot.take() {
                if self.len > 0 {
                    k.slice_set(&old.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    v.slice_set(&old.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            *slot = Some(LayerCache { k, v });
        }
        self.capacity = capacity;
        Ok(())
    }
}
