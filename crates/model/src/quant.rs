//! Quantized weights for the CPU: which kind a model is loaded with, and the matmul op that
//! runs our Q8_0 kernel inside candle's graph.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

use crate::error::{Error, Result as ModelResult};
use crate::q8::Q8Weights;

/// How the projections' weights are held. Activations, norms and attention stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quant {
    /// The checkpoint's weights in the compute dtype: the token-exact mode.
    #[default]
    None,
    /// 8-bit weights in blocks of 32 with one scale each (GGML's Q8_0), run by our AVX-512
    /// VNNI kernel: about 1.06 bytes per weight.
    Q8_0,
    /// GGML's 4-bit k-quant through candle's `QMatMul`: saves memory, not time (its kernel is
    /// compute-bound). Projections whose input width is not a multiple of 256 fall back to Q8_0.
    Q4K,
}

impl Quant {
    pub fn as_str(self) -> &'static str {
        match self {
            Quant::None => "none",
            Quant::Q8_0 => "q8_0",
            Quant::Q4K => "q4k",
        }
    }

    /// Parses `none`, `q8_0` or `q4k`, or `auto`: the fastest kind for `device` (Q8_0 on the
    /// CPU, where it beats f32 several times over; none on CUDA, where quantized weights are
    /// not supported yet).
    pub fn parse(s: &str, device: &candle_core::Device) -> ModelResult<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(if device.is_cpu() { Quant::Q8_0 } else { Quant::None }),
            "none" => Ok(Quant::None),
            "q8_0" | "q8" => Ok(Quant::Q8_0),
            "q4k" | "q4_k" => Ok(Quant::Q4K),
            other => Err(Error::InvalidRequest(format!("unknown quantization `{other}`: use auto, none, q8_0 or q4k"))),
        }
    }
}

/// `x [m, k] · Wᵀ + b` with `W` held as Q8_0, as a candle op on f32 CPU tensors. The bias is
/// added here, row by row while the output is still in cache, rather than as a separate
/// broadcast op over the whole output.
#[derive(Clone)]
pub struct Q8MatMul {
    pub weights: Arc<Q8Weights>,
    pub bias: Option<Arc<[f32]>>,
}

impl CustomOp1 for Q8MatMul {
    fn name(&self) -> &'static str {
        "q8_0-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("q8_0 matmul takes f32 activations") };
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("q8_0 matmul needs contiguous activations") };
        let (m, k) = layout.shape().dims2()?;
        if k != self.weights.k() {
            candle_core::bail!("q8_0 matmul: activations have {k} columns, the weights {}", self.weights.k())
        }
        let n = self.weights.n();
        let mut out = vec![0f32; m * n];
        self.weights.matmul(&data[start..end], m, &mut out);
        if let Some(bias) = &self.bias {
            use rayon::prelude::*;
            out.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(bias.iter()).for_each(|(y, b)| *y += b));
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}
