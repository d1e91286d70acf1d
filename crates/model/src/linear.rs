//! The one linear layer every projection of the model goes through, so that later additions
//! (LoRA deltas, quantised weights) land in a single place.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::lora::{canonical_module, RowAdapters};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Canonical module path (`model.layers.0.self_attn.q_proj`), the key adapters use.
    name: String,
}

impl Linear {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias, name: canonical_module(&vb.prefix()) })
    }

    pub fn from_weights(weight: Tensor, bias: Option<Tensor>, name: &str) -> Self {
        Self { weight, bias, name: name.to_string() }
    }

    /// `x W^T + b`, plus the LoRA delta of whichever adapter covers each row span.
    pub fn forward_with(&self, x: &Tensor, rows: &RowAdapters) -> Result<Tensor> {
        let y = self.forward(x)?;
        rows.apply(&self.name, x, y)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    /// `x W^T + b` for `x` of shape `[..., in]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_shape = dims[..dims.len() - 1].to_vec();
        out_shape.push(self.weight.dim(0)?);
        y.reshape(out_shape)
    }
}
