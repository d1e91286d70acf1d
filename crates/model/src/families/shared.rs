//! Vision-tower parts more than one family uses: 2D-rotary attention over spans of patches
//! (whole images or windows, never across them), the blocks, the patch merger, and the
//! bookkeeping of where each image's rows are.

use candle_core::{DType, Device, Result, Tensor};

use crate::adapters::lora::{LoraAdapter, RowAdapters};
use crate::kernels::fused::{self, Activation, Combine};
use crate::layers::linear::Linear;
use crate::layers::norm::Norm;
use crate::layers::quant::Quant;
use crate::loading::weights::Loader;
use crate::stage_profile::{self, Op};

/// Every vision norm in the published checkpoints uses this epsilon.
pub(crate) const VISION_NORM_EPS: f64 = 1e-6;

pub(crate) struct VisionAttention {
    pub qkv: Linear,
    pub proj: Linear,
    num_heads: usize,
    head_dim: usize,
    /// Attention may run in bf16 on AMX tiles: in the quantized modes, never the exact one.
    bf16_tiles: bool,
}

impl VisionAttention {
    pub fn load(vb: Loader, width: usize, num_heads: usize) -> Result<Self> {
        Ok(Self {
            qkv: Linear::load(vb.pp("qkv"), width, width * 3, true)?,
            proj: Linear::load(vb.pp("proj"), width, width, true)?,
            num_heads,
            head_dim: width / num_heads,
            bf16_tiles: vb.quant() != Quant::None,
        })
    }

    /// `residual` plus attention over `x`, whose rows attend only within their span of
    /// `spans` (an image, or one attention window of it).
    pub fn forward(&self, x: &Tensor, rotary: &Rotary, spans: &[(usize, usize)], rows: &RowAdapters, residual: &Tensor) -> Result<Tensor> {
        let seq = x.dim(0)?;
        let qkv = self.qkv.forward_with(x, rows)?;
        let dtype = x.dtype();
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (cos, sin) = (&rotary.cos, &rotary.sin);
        let attention = stage_profile::op(Op::Attention);
        let out = if fused::handles(x) {
            fused::vision_self_attention(&qkv, cos, sin, self.num_heads, spans, scale as f32, self.bf16_tiles)?
        } else {
            // [seq, 3, heads, head_dim] -> three [1, heads, seq, head_dim]
            let qkv = qkv.reshape((seq, 3, self.num_heads, self.head_dim))?.permute((1, 2, 0, 3))?;
            // Rotary in f32, as the reference does.
            let rot = |i: usize| -> Result<Tensor> {
                let t = qkv.get(i)?.unsqueeze(0)?.to_dtype(DType::F32)?.contiguous()?;
                candle_nn::rotary_emb::rope(&t, cos, sin)?.to_dtype(dtype)
            };
            let (q, k) = (rot(0)?, rot(1)?);
            let v = qkv.get(2)?.unsqueeze(0)?.contiguous()?;
            let mut outs = Vec::with_capacity(spans.len());
            for &(start, len) in spans {
                let (q, k, v) = (q.narrow(2, start, len)?, k.narrow(2, start, len)?, v.narrow(2, start, len)?);
                let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
                outs.push(probs.matmul(&v.contiguous()?)?);
            }
            // [1, heads, seq, head_dim] -> [seq, heads * head_dim]
            Tensor::cat(&outs, 2)?.squeeze(0)?.transpose(0, 1)?.reshape((seq, self.num_heads * self.head_dim))?
        };
        drop(attention);
        self.proj.forward_fused(&out, rows, None, Some((Combine::Add, residual)))
    }
}

/// The vision blocks' MLPs.
pub(crate) enum VisionMlp {
    /// `fc2(act(fc1(x)))`: Qwen2-VL (quick_gelu), Qwen3-VL (gelu_pytorch_tanh).
    Plain { fc1: Linear, fc2: Linear, act: Activation },
    /// `down(silu(gate(x)) * up(x))`, with biases: Qwen2.5-VL.
    Gated { gate: Linear, up: Linear, down: Linear },
}

impl VisionMlp {
    /// `residual` plus the MLP of `x`; activations, gating and the residual add ride on the
    /// projections' output passes.
    fn forward(&self, x: &Tensor, rows: &RowAdapters, residual: &Tensor) -> Result<Tensor> {
        match self {
            VisionMlp::Plain { fc1, fc2, act } => {
                let h = fc1.forward_fused(x, rows, Some(*act), None)?;
                fc2.forward_fused(&h, rows, None, Some((Combine::Add, residual)))
            }
            VisionMlp::Gated { gate, up, down } => {
                let g = gate.forward_fused(x, rows, Some(Activation::Silu), None)?;
                let h = up.forward_fused(x, rows, None, Some((Combine::Mul, &g)))?;
                down.forward_fused(&h, rows, None, Some((Combine::Add, residual)))
            }
        }
    }

    fn projections(&self) -> Vec<&Linear> {
        match self {
            VisionMlp::Plain { fc1, fc2, .. } => vec![fc1, fc2],
            VisionMlp::Gated { gate, up, down } => vec![gate, up, down],
        }
    }
}

pub(crate) struct VisionBlock {
    pub norm1: Norm,
    pub norm2: Norm,
    pub attn: VisionAttention,
    pub mlp: VisionMlp,
}

impl VisionBlock {
    pub fn forward(&self, x: &Tensor, rotary: &Rotary, spans: &[(usize, usize)], rows: &RowAdapters) -> Result<Tensor> {
        let x = self.attn.forward(&self.norm1.forward(x)?, rotary, spans, rows, x)?;
        self.mlp.forward(&self.norm2.forward(&x)?, rows, &x)
    }

    pub fn projections(&self) -> Vec<&Linear> {
        let mut out = vec![&self.attn.qkv, &self.attn.proj];
        out.extend(self.mlp.projections());
        out
    }
}

/// Groups `merge x merge` neighbouring patches into one token: norm, concatenate, MLP with an
/// exact GELU.
pub(crate) struct PatchMerger {
    pub norm: Norm,
    /// Normalise the concatenated group (Qwen3-VL's DeepStack mergers) rather than each patch.
    pub norm_after_grouping: bool,
    pub fc1: Linear,
    pub fc2: Linear,
    /// Width of a group: the patch width times the merge unit.
    pub group: usize,
}

impl PatchMerger {
    pub fn forward(&self, x: &Tensor, rows: &RowAdapters) -> Result<Tensor> {
        let x = if self.norm_after_grouping {
            self.norm.forward(&x.reshape(((), self.group))?)?
        } else {
            self.norm.forward(x)?.reshape(((), self.group))?
        };
        self.fc2.forward_with(&self.fc1.forward_with(&x, rows)?.gelu_erf()?, rows)
    }
}

/// The projections adapters may target in a tower of `blocks` and `mergers` (never the patch
/// embedding).
pub(crate) fn adaptable<'a>(blocks: &'a [VisionBlock], mergers: impl IntoIterator<Item = &'a PatchMerger>) -> Vec<&'a Linear> {
    let mut out: Vec<&Linear> = blocks.iter().flat_map(VisionBlock::projections).collect();
    out.extend(mergers.into_iter().flat_map(|m| [&m.fc1, &m.fc2]));
    out
}

/// cos/sin `[patches, head_dim / 2]` of the vision tower's 2D rotary: the first half rotates by
/// the patch row, the second by the column.
pub(crate) struct Rotary {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rotary {
    /// The axial frequencies for heads of `head_dim`: `head_dim / 4` of them, each used for the
    /// row and for the column.
    pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
        let spatial = head_dim / 2;
        (0..spatial).step_by(2).map(|i| 1.0 / (theta as f32).powf(i as f32 / spatial as f32)).collect()
    }

    /// For patches in merge-group order (see [`merge_order`]).
    pub fn new(grids: &[[usize; 3]], merge: usize, inv_freq: &[f32], device: &Device) -> Result<Self> {
        let nf = inv_freq.len();
        let total: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let mut angles = Vec::with_capacity(total * nf * 2);
        for &[t, h, w] in grids {
            for _ in 0..t {
                for (row, col) in merge_order(h, w, merge) {
                    angles.extend(inv_freq.iter().map(|f| row as f32 * f));
                    angles.extend(inv_freq.iter().map(|f| col as f32 * f));
                }
            }
        }
        let angles = Tensor::from_vec(angles, (total, nf * 2), device)?;
        Ok(Self { cos: angles.cos()?, sin: angles.sin()? })
    }

    /// The same rows, reordered: row `i` of the result is row `order[i]` of `self`.
    pub fn select(&self, order: &Tensor) -> Result<Self> {
        Ok(Self { cos: self.cos.index_select(order, 0)?, sin: self.sin.index_select(order, 0)? })
    }
}

/// `(row, col)` of each patch of an `h x w` grid in the order the processor emits them: merge
/// groups in row-major order, and within a group its `merge x merge` patches row-major.
pub(crate) fn merge_order(h: usize, w: usize, merge: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..h / merge).flat_map(move |bh| {
        (0..w / merge).flat_map(move |bw| (0..merge).flat_map(move |mh| (0..merge).map(move |mw| (bh * merge + mh, bw * merge + mw))))
    })
}

/// Where each image's rows are, at patch and at merged-token granularity.
pub(crate) struct ImageRows<'a> {
    /// One span per frame: full attention within it.
    pub frames: Vec<(usize, usize)>,
    /// Each image's patch rows with its adapter.
    pub patches: RowAdapters<'a>,
    /// Each image's merged-token rows with its adapter.
    pub merged: RowAdapters<'a>,
    /// Merged tokens per image.
    pub tokens: Vec<usize>,
}

impl<'a> ImageRows<'a> {
    pub fn new(grids: &[[usize; 3]], adapters: &[Option<&'a LoraAdapter>], merge_unit: usize) -> Self {
        let mut frames = Vec::new();
        let mut start = 0;
        for &[t, h, w] in grids {
            for _ in 0..t {
                frames.push((start, h * w));
                start += h * w;
            }
        }
        let patches = |g: &[usize; 3]| g[0] * g[1] * g[2];
        let tokens: Vec<usize> = grids.iter().map(|g| patches(g) / merge_unit).collect();
        Self {
            frames,
            patches: RowAdapters::from_spans(grids.iter().zip(adapters).map(|(g, a)| (patches(g), *a))),
            merged: RowAdapters::from_spans(tokens.iter().zip(adapters).map(|(&n, a)| (n, *a))),
            tokens,
        }
    }

    /// Splits rows of merged tokens into one tensor per image.
    pub fn split(&self, merged: &Tensor) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(self.tokens.len());
        let mut offset = 0;
        for &n in &self.tokens {
            out.push(merged.narrow(0, offset, n)?);
            offset += n;
        }
        Ok(out)
    }
}

/// The patch embedding: a Conv3d whose kernel equals its stride, i.e. one matmul over the
/// flattened patches.
pub(crate) fn patch_embed(vb: &Loader, width: usize, patch_len: usize, bias: bool) -> Result<Linear> {
    let patch = vb.pp("patch_embed.proj");
    let bias = if bias { Some(patch.get(width, "bias")?) } else { None };
    let name = crate::adapters::lora::canonical_module(&patch.prefix());
    Linear::from_checkpoint(&patch, &patch.path("weight"), bias, width, patch_len, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_order_walks_groups_then_patches() {
        let order: Vec<_> = merge_order(2, 4, 2).collect();
        assert_eq!(order, vec![(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
    }
}
