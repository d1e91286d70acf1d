//! Quantized weights for the CPU: which kind a model is loaded with, and the matmul op that
//! runs our Q8_0 kernel inside candle's graph.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape};

use crate::kernels::fused::{Activation, Combine};

use crate::error::{Error, Result as ModelResult};
use crate::kernels::q8::{Epilogue, Q8Weights};

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

/// `x [m, k] · Wᵀ + b` with `W` held as Q8_0, as a candle op on f32 CPU tensors, optionally
/// followed by an activation and a combination with a second operand (`Q8MatMul::fused`).
/// The bias and whatever follows are applied block by block while the output is still in
/// cache (see [`Q8Weights::matmul_spans`]), rather than as separate passes over the output.
#[derive(Clone)]
pub struct Q8MatMul {
    pub weights: Arc<Q8Weights>,
    pub bias: Option<Arc<[f32]>>,
    activation: Option<Activation>,
    /// How the second operand of the `CustomOp2` form joins the output.
    combine: Combine,
    /// The rows' spans (sequences, images), which choose the kernel (see
    /// [`Q8Weights::matmul_spans`]); empty: one span.
    spans: Arc<[(usize, usize)]>,
}

impl Q8MatMul {
    pub fn new(weights: Arc<Q8Weights>, bias: Option<Arc<[f32]>>) -> Self {
        Q8MatMul { weights, bias, activation: None, combine: Combine::Add, spans: Arc::new([]) }
    }

    /// The same product with `activation` applied to its output, then (as a `CustomOp2`) the
    /// second operand combined by `combine`.
    pub fn fused(&self, activation: Option<Activation>, combine: Combine) -> Self {
        Q8MatMul { activation, combine, ..self.clone() }
    }

    /// The same product for rows in these spans.
    pub fn for_rows(&self, spans: Vec<(usize, usize)>) -> Self {
        Q8MatMul { spans: spans.into(), ..self.clone() }
    }

    /// `act(x·Wᵀ + b) ∘ other` for x `[m, k]` (contiguous), other `[m, n]`.
    fn run(&self, x: &[f32], m: usize, other: Option<&[f32]>) -> Vec<f32> {
        let n = self.weights.n();
        let (bias, activation, combine) = (self.bias.as_deref(), self.activation, self.combine);
        let epilogue = |row: usize, col0: usize, seg: &mut [f32]| {
            if let Some(bias) = bias {
                seg.iter_mut().zip(&bias[col0..]).for_each(|(y, b)| *y += b);
            }
            if let Some(activation) = activation {
                activation.apply_in_place(seg);
            }
            if let Some(other) = other {
                combine.apply_in_place(seg, &other[row * n + col0..]);
            }
        };
        let mut out = Vec::with_capacity(m * n);
        let any = bias.is_some() || activation.is_some() || other.is_some();
        let epilogue = any.then_some(&epilogue as Epilogue);
        self.weights.matmul_uninit(x, m, &mut out.spare_capacity_mut()[..m * n], epilogue, &self.spans);
        // SAFETY: `matmul_uninit` wrote all m·n elements.
        unsafe { out.set_len(m * n) };
        out
    }

    fn check<'a>(&self, storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], usize)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("q8_0 matmul takes f32 activations") };
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("q8_0 matmul needs contiguous activations") };
        let (m, k) = layout.shape().dims2()?;
        if k != self.weights.k() {
            candle_core::bail!("q8_0 matmul: activations have {k} columns, the weights {}", self.weights.k())
        }
        Ok((&data[start..end], m))
    }
}

impl CustomOp1 for Q8MatMul {
    fn name(&self) -> &'static str {
        "q8_0-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m) = self.check(storage, layout)?;
        Ok((CpuStorage::F32(self.run(x, m, None)), Shape::from((m, self.weights.n()))))
    }
}

/// The product combined with a second operand `[m, n]` (a residual, or the gate).
impl CustomOp2 for Q8MatMul {
    fn name(&self) -> &'static str {
        "q8_0-matmul-combine"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout, res: &CpuStorage, res_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m) = self.check(x, x_layout)?;
        let n = self.weights.n();
        let CpuStorage::F32(res) = res else { candle_core::bail!("q8_0 matmul: the residual must be f32") };
        let Some((start, end)) = res_layout.contiguous_offsets() else {
            candle_core::bail!("q8_0 matmul: the residual must be contiguous")
        };
        if res_layout.shape().dims() != [m, n] {
            candle_core::bail!("q8_0 matmul: residual shape {:?}, expected [{m}, {n}]", res_layout.shape())
        }
        Ok((CpuStorage::F32(self.run(x, m, Some(&res[start..end]))), Shape::from((m, n))))
    }
}
