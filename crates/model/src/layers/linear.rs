//! The one linear layer every projection of the model goes through, so that LoRA deltas and
//! quantized weights land in a single place.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};

use crate::adapters::lora::{canonical_module, RowAdapters};
use crate::kernels::fused::{Activation, Combine};
use crate::kernels::q8::Q8Weights;
use crate::layers::quant::{Q8MatMul, Quant};
use crate::loading::weights::Loader;
use crate::stage_profile::{self, Op};

#[derive(Clone)]
enum Weight {
    /// `[out, in]` in the compute dtype.
    Dense(Tensor),
    Q8(Q8MatMul),
    Ggml(QMatMul),
}

#[derive(Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_dim: usize,
    in_dim: usize,
    /// Canonical module path (`model.layers.0.self_attn.q_proj`), the key adapters use.
    name: String,
}

impl Linear {
    /// `weight` (and `bias`) under `loader`'s prefix, quantized as the loader says.
    pub fn load(loader: Loader, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bias = if bias { Some(loader.get(out_dim, "bias")?) } else { None };
        Self::from_checkpoint(&loader, &loader.path("weight"), bias, out_dim, in_dim, &canonical_module(&loader.prefix()))
    }

    /// The projection whose weight is the checkpoint tensor `path`, stored with `out_dim` rows
    /// of `in_dim` values (whatever its stored rank, e.g. a convolution kernel whose stride
    /// equals its size). Quantized straight from the mapped bytes when the loader quantizes.
    pub fn from_checkpoint(
        loader: &Loader,
        path: &str,
        mut bias: Option<Tensor>,
        out_dim: usize,
        in_dim: usize,
        name: &str,
    ) -> Result<Self> {
        let (_, stored) = loader.mapped().stored(path)?;
        if stored.first() != Some(&out_dim) || stored.iter().product::<usize>() != out_dim * in_dim {
            candle_core::bail!("shape mismatch for {path}: the checkpoint has {stored:?}, the config implies [{out_dim}, {in_dim}]")
        }
        let weight = match loader.quant() {
            Quant::None => {
                let w = loader.mapped().tensor(path, &candle_core::Device::Cpu)?;
                Weight::Dense(w.reshape((out_dim, in_dim))?.to_dtype(loader.dtype())?.to_device(loader.device())?)
            }
            Quant::Q4K if in_dim.is_multiple_of(GgmlDType::Q4K.block_size()) => {
                let w = loader.mapped().tensor(path, &candle_core::Device::Cpu)?.reshape((out_dim, in_dim))?.to_dtype(DType::F32)?;
                Weight::Ggml(QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4K)?)?)
            }
            Quant::Q8_0 | Quant::Q4K => {
                let cached = loader.cache().and_then(|c| c.get(path, out_dim, in_dim));
                let weights = match cached {
                    Some(w) => Arc::new(w),
                    None => {
                        let w = Arc::new(quantize_q8(loader, path, out_dim, in_dim)?);
                        if let Some(cache) = loader.cache() {
                            cache.record(path, w.clone());
                        }
                        w
                    }
                };
                // The op adds the bias itself (see `Q8MatMul`).
                let fused = bias.take().map(|b| b.to_vec1::<f32>().map(Arc::from)).transpose()?;
                Weight::Q8(Q8MatMul::new(weights, fused))
            }
        };
        Ok(Self { weight, bias, out_dim, in_dim, name: name.to_string() })
    }

    /// A dense projection sharing an existing `[out, in]` tensor (a tied output head).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, name: &str) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        Ok(Self { weight: Weight::Dense(weight), bias, out_dim, in_dim, name: name.to_string() })
    }

    /// `x W^T + b`, plus the LoRA delta of whichever adapter covers each row span.
    pub fn forward_with(&self, x: &Tensor, rows: &RowAdapters) -> Result<Tensor> {
        let y = self.project(x, rows)?;
        let _timer = stage_profile::op(Op::Lora);
        rows.apply(&self.name, x, y)
    }

    /// `x W^T + b` for `x` of shape `[..., in]` whose rows come in `rows`' spans (no LoRA): the
    /// spans choose the quantized kernel, so a row's numbers do not depend on its batch.
    pub fn project(&self, x: &Tensor, rows: &RowAdapters) -> Result<Tensor> {
        let dims = x.dims();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, self.in_dim))?;
        let _timer = stage_profile::op(Op::Products);
        let y = match &self.weight {
            Weight::Dense(w) => x2.matmul(&w.t()?)?,
            Weight::Q8(op) => x2.contiguous()?.apply_op1_no_bwd(&op.for_rows(rows.spans()))?,
            Weight::Ggml(q) => q.forward(&x2.contiguous()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_shape = dims[..dims.len() - 1].to_vec();
        out_shape.push(self.out_dim);
        y.reshape(out_shape)
    }

    /// `activation(x Wᵀ + b + LoRA)`, then combined with `other` (a residual added, or a gate
    /// multiplied); either optional, `x` and `other` 2-D. With quantized weights and no adapter
    /// on this module in the batch, all of it runs inside the product's output pass instead of
    /// as passes of their own.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        rows: &RowAdapters,
        activation: Option<Activation>,
        other: Option<(Combine, &Tensor)>,
    ) -> Result<Tensor> {
        if let Weight::Q8(op) = &self.weight {
            if !rows.adapts(&self.name) && crate::kernels::fused::handles(x) {
                let _timer = stage_profile::op(Op::Products);
                let x = x.contiguous()?;
                let spans = rows.spans();
                return match other {
                    Some((combine, o)) => x.apply_op2_no_bwd(&o.contiguous()?, &op.fused(activation, combine).for_rows(spans)),
                    None => x.apply_op1_no_bwd(&op.fused(activation, Combine::Add).for_rows(spans)),
                };
            }
        }
        let y = self.forward_with(x, rows)?;
        let y = match activation {
            Some(a) => a.apply(&y)?,
            None => y,
        };
        match other {
            Some((combine, o)) => combine.apply(&y, o),
            None => Ok(y),
        }
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes the weight takes in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Q8(q) => q.weights.bytes(),
            Weight::Ggml(_) => self.out_dim * self.in_dim / GgmlDType::Q4K.block_size() * GgmlDType::Q4K.type_size(),
        }
    }
}

/// Q8_0 blocks built row by row from the stored values, never holding an f32 copy of the
/// whole matrix.
fn quantize_q8(loader: &Loader, path: &str, out_dim: usize, in_dim: usize) -> Result<Q8Weights> {
    loader.mapped().with_bytes(path, |bytes, dtype, _| {
        let width = dtype.size_in_bytes();
        let row_bytes = in_dim * width;
        let read_row = |i: usize, out: &mut [f32]| {
            let row = &bytes[i * row_bytes..(i + 1) * row_bytes];
            for (dst, src) in out.iter_mut().zip(row.chunks_exact(width)) {
                *dst = match dtype {
                    DType::BF16 => f32::from_bits((u16::from_le_bytes([src[0], src[1]]) as u32) << 16),
                    DType::F16 => half::f16::from_le_bytes([src[0], src[1]]).to_f32(),
                    _ => f32::from_le_bytes([src[0], src[1], src[2], src[3]]),
                };
            }
        };
        match dtype {
            DType::BF16 | DType::F16 | DType::F32 => Ok(Q8Weights::quantize(out_dim, in_dim, read_row)),
            other => candle_core::bail!("{path}: cannot quantize {other:?} weights"),
        }
    })
}

impl Module for Linear {
    /// `x W^T + b` for `x` of shape `[..., in]`, its rows one span.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.project(x, &RowAdapters::none())
    }
}
