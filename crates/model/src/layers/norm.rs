//! The normalisations: LayerNorm (vision tower) and RMSNorm (decoder), each a struct with its
//! own `forward`, as in candle-transformers.
//!
//! Why not candle-nn's: its CPU kernels sum each row into one f32 accumulator (a serial
//! dependency LLVM may not vectorise) and zero their output first; on the 2B vision tower that
//! was 0.18 s of a 2.6 s encode for 64 norms over 1564 × 1280. Here a row is summed in 16
//! lanes, compiled for AVX-512 where present, over blocks of rows in parallel. LayerNorm also
//! centres before squaring (two passes, as torch does) instead of `E[x²] − E[x]²`.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::kernels::fused::{dispatch, handles};
use crate::loading::weights::Loader;
use crate::stage_profile::{self, Op};

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    /// `weight` and `bias` as f32 slices, read once here rather than on every call (a decode
    /// step runs dozens of norms); `None` off the CPU.
    host: Option<(Vec<f32>, Vec<f32>)>,
    eps: f32,
}

impl LayerNorm {
    pub fn load(vb: Loader, size: usize, eps: f64) -> Result<Self> {
        Self::new(vb.get(size, "weight")?, vb.get(size, "bias")?, eps as f32)
    }

    fn new(weight: Tensor, bias: Tensor, eps: f32) -> Result<Self> {
        let host = match (host_copy(&weight)?, host_copy(&bias)?) {
            (Some(w), Some(b)) => Some((w, b)),
            _ => None,
        };
        Ok(Self { weight, bias, host, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = stage_profile::op(Op::Norms);
        if let (true, Some((weight, bias))) = (handles(x), &self.host) {
            return x.contiguous()?.apply_op1_no_bwd(&NormOp { weight, bias: Some(bias), eps: self.eps })?.reshape(x.shape());
        }
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

pub struct RmsNorm {
    weight: Tensor,
    /// As [`LayerNorm`]'s.
    host: Option<Vec<f32>>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: Loader, size: usize, eps: f64) -> Result<Self> {
        Self::new(vb.get(size, "weight")?, eps as f32)
    }

    fn new(weight: Tensor, eps: f32) -> Result<Self> {
        Ok(Self { host: host_copy(&weight)?, weight, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _timer = stage_profile::op(Op::Norms);
        if let (true, Some(weight)) = (handles(x), &self.host) {
            return x.contiguous()?.apply_op1_no_bwd(&NormOp { weight, bias: None, eps: self.eps })?.reshape(x.shape());
        }
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// The norm a layer uses, where families differ (Qwen2.5-VL's vision tower has RMSNorm where
/// Qwen2-VL and Qwen3-VL have LayerNorm).
pub enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}

/// A CPU f32 vector's values, for the kernels below; `None` for tensors they do not handle.
fn host_copy(t: &Tensor) -> Result<Option<Vec<f32>>> {
    handles(t).then(|| t.flatten_all()?.to_vec1::<f32>()).transpose()
}

/// Normalises each row of a contiguous f32 tensor over its last dimension: LayerNorm when
/// there is a bias, RMSNorm otherwise.
struct NormOp<'a> {
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    eps: f32,
}

/// Rows per parallel task: enough work to amortise a task (tens of KB).
const ROWS_PER_TASK: usize = 16;

impl CustomOp1 for NormOp<'_> {
    fn name(&self) -> &'static str {
        if self.bias.is_some() {
            "layer-norm"
        } else {
            "rms-norm"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("norm takes f32") };
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("norm needs a contiguous tensor") };
        let x = &data[start..end];
        let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let (weight, bias) = (self.weight, self.bias);
        if weight.len() != width || bias.is_some_and(|b| b.len() != width) {
            candle_core::bail!("norm: weight of {} for rows of {width}", weight.len())
        }
        // Written row by row without zeroing first: a fresh output of several MB costs more to
        // zero than to normalise into.
        let mut out = Vec::with_capacity(x.len());
        let rows = out.spare_capacity_mut()[..x.len()].par_chunks_mut(width * ROWS_PER_TASK);
        rows.zip(x.par_chunks(width * ROWS_PER_TASK)).for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
                match bias {
                    Some(b) => layer_norm_row(x, weight, b, self.eps, o),
                    None => rms_norm_row(x, weight, self.eps, o),
                }
            }
        });
        // SAFETY: every row (hence every element) was written above.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Sum of `f(x)` over a row in 16 lanes (see the module docs).
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l += f(x);
        }
    }
    chunks.remainder().iter().map(|&x| f(x)).sum::<f32>() + lanes.iter().sum::<f32>()
}

dispatch!(layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let n = x.len() as f32;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
        o.write((v - mean) * inv * w + b);
    }
});

dispatch!(rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let inv = 1.0 / (lane_sum(x, |v| v * v) / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        o.write(v * inv * w);
    }
});

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{LayerNorm, RmsNorm};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Both norms against candle's ops, on widths with and without a ragged 16-lane tail and
    /// an input of rank 3 (the shape must come back as it went in).
    #[test]
    fn norms_match_candle() {
        let dev = Device::Cpu;
        for &width in &[1280, 37, 8] {
            let x = (Tensor::randn(0f32, 3.0, (2, 45, width), &dev).unwrap() + 1.5).unwrap();
            let weight = Tensor::randn(1f32, 0.5, width, &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.5, width, &dev).unwrap();
            let eps = 1e-6;
            let ln = LayerNorm::new(weight.clone(), bias.clone(), eps).unwrap();
            let got = ln.forward(&x).unwrap();
            assert_eq!(got.dims(), x.dims());
            let want = candle_nn::ops::layer_norm(&x, &weight, &bias, eps).unwrap();
            assert!(max_diff(&got, &want) < 1e-4, "layer norm, width {width}: {}", max_diff(&got, &want));
            let rms = RmsNorm::new(weight.clone(), eps).unwrap();
            let got = rms.forward(&x).unwrap();
            let want = candle_nn::ops::rms_norm(&x, &weight, eps).unwrap();
            assert!(max_diff(&got, &want) < 1e-4, "rms norm, width {width}: {}", max_diff(&got, &want));
        }
    }
}
