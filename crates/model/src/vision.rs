//! The Qwen2-VL vision tower: patch embedding, 2D rotary attention blocks (full attention within
//! each image, never across images) and the patch merger that maps groups of
//! `merge x merge` patches to language-model embeddings.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::VisionConfig;
use crate::cpu_kernels::{self, Activation, Combine};
use crate::linear::Linear;
use crate::lora::{LoraAdapter, RowAdapters};
use crate::norm::LayerNorm;
use crate::weights::Loader;

const LAYER_NORM_EPS: f64 = 1e-6;

struct VisionAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
    /// Attention may run in bf16 on AMX tiles: in the quantized modes, never the exact one.
    bf16_tiles: bool,
}

impl VisionAttention {
    fn load(vb: Loader, cfg: &VisionConfig) -> Result<Self> {
        Ok(Self {
            qkv: Linear::load(vb.pp("qkv"), cfg.embed_dim, cfg.embed_dim * 3, true)?,
            proj: Linear::load(vb.pp("proj"), cfg.embed_dim, cfg.embed_dim, true)?,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
            bf16_tiles: vb.quant() != crate::quant::Quant::None,
        })
    }

    /// `residual` plus attention over `x`, which holds the patches of several images back to
    /// back; `spans` gives each image's range.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        spans: &[(usize, usize)],
        rows: &RowAdapters,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let seq = x.dim(0)?;
        let qkv = self.qkv.forward_with(x, rows)?;
        let dtype = x.dtype();
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = if cpu_kernels::handles(x) {
            cpu_kernels::vision_self_attention(&qkv, cos, sin, self.num_heads, spans, scale as f32, self.bf16_tiles)?
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
        self.proj.forward_fused(&out, rows, None, Some((Combine::Add, residual)))
    }
}

struct VisionBlock {
    norm1: LayerNorm,
    norm2: LayerNorm,
    attn: VisionAttention,
    fc1: Linear,
    fc2: Linear,
}

impl VisionBlock {
    fn load(vb: Loader, cfg: &VisionConfig) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), cfg.embed_dim, LAYER_NORM_EPS)?,
            norm2: LayerNorm::load(vb.pp("norm2"), cfg.embed_dim, LAYER_NORM_EPS)?,
            attn: VisionAttention::load(vb.pp("attn"), cfg)?,
            fc1: Linear::load(vb.pp("mlp.fc1"), cfg.embed_dim, cfg.mlp_hidden(), true)?,
            fc2: Linear::load(vb.pp("mlp.fc2"), cfg.mlp_hidden(), cfg.embed_dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, spans: &[(usize, usize)], rows: &RowAdapters) -> Result<Tensor> {
        // The residual adds and the activation ride on the projections' output pass.
        let x = self.attn.forward(&self.norm1.forward(x)?, cos, sin, spans, rows, x)?;
        let h = self.fc1.forward_fused(&self.norm2.forward(&x)?, rows, Some(Activation::QuickGelu), None)?;
        self.fc2.forward_fused(&h, rows, None, Some((Combine::Add, &x)))
    }
}

struct PatchMerger {
    ln_q: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    group: usize,
}

impl PatchMerger {
    fn load(vb: Loader, cfg: &VisionConfig) -> Result<Self> {
        let group = cfg.embed_dim * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            ln_q: LayerNorm::load(vb.pp("ln_q"), cfg.embed_dim, LAYER_NORM_EPS)?,
            fc1: Linear::load(vb.pp("mlp.0"), group, group, true)?,
            fc2: Linear::load(vb.pp("mlp.2"), group, cfg.hidden_size, true)?,
            group,
        })
    }

    fn forward(&self, x: &Tensor, rows: &RowAdapters) -> Result<Tensor> {
        let x = self.ln_q.forward(x)?.reshape(((), self.group))?;
        self.fc2.forward_with(&self.fc1.forward_with(&x, rows)?.gelu_erf()?, rows)
    }
}

pub struct VisionTower {
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    inv_freq: Vec<f32>,
    cfg: VisionConfig,
}

impl VisionTower {
    pub fn load(vb: Loader, cfg: &VisionConfig, rope_theta: f64) -> Result<Self> {
        // The Conv3d's kernel equals its stride, so it is one matmul over flattened patches.
        let patch = vb.pp("patch_embed.proj");
        let patch_embed =
            Linear::from_checkpoint(&patch, &patch.path("weight"), None, cfg.embed_dim, cfg.patch_len(), "visual.patch_embed.proj")?;
        let blocks = (0..cfg.depth).map(|i| VisionBlock::load(vb.pp(format!("blocks.{i}")), cfg)).collect::<Result<_>>()?;
        let merger = PatchMerger::load(vb.pp("merger"), cfg)?;
        // Axial rotary: head_dim / 4 frequencies, each used for the row and for the column.
        let spatial = cfg.head_dim() / 2;
        let inv_freq = (0..spatial).step_by(2).map(|i| 1.0 / (rope_theta as f32).powf(i as f32 / spatial as f32)).collect();
        Ok(Self { patch_embed, blocks, merger, inv_freq, cfg: cfg.clone() })
    }

    /// Encodes images given as concatenated flattened patches `[sum(t*h*w), patch_len]` with
    /// their grids and each image's adapter; returns one `[t*h*w / merge^2, hidden]` embedding
    /// tensor per image.
    pub fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]], adapters: &[Option<&LoraAdapter>]) -> Result<Vec<Tensor>> {
        let device = pixels.device();
        let (cos, sin) = self.rotary(grids, device)?;
        let mut spans = Vec::new();
        let mut start = 0;
        for &[t, h, w] in grids {
            for _ in 0..t {
                spans.push((start, h * w));
                start += h * w;
            }
        }
        let per_group = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let patch_rows = RowAdapters::from_spans(grids.iter().zip(adapters).map(|(g, a)| (g[0] * g[1] * g[2], *a)));
        let merged_rows = RowAdapters::from_spans(grids.iter().zip(adapters).map(|(g, a)| (g[0] * g[1] * g[2] / per_group, *a)));
        let mut x = self.patch_embed.project(pixels, &patch_rows)?;
        for block in &self.blocks {
            x = block.forward(&x, &cos, &sin, &spans, &patch_rows)?;
        }
        let merged = self.merger.forward(&x, &merged_rows)?;
        let mut out = Vec::with_capacity(grids.len());
        let mut offset = 0;
        for &[t, h, w] in grids {
            let n = t * h * w / per_group;
            out.push(merged.narrow(0, offset, n)?);
            offset += n;
        }
        Ok(out)
    }

    /// cos/sin `[patches, head_dim / 2]`: the first half rotates by the patch row, the second by
    /// the column, with patches in merge-group order.
    fn rotary(&self, grids: &[[usize; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let m = self.cfg.spatial_merge_size;
        let nf = self.inv_freq.len();
        let total: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let mut angles = Vec::with_capacity(total * nf * 2);
        for &[t, h, w] in grids {
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for mh in 0..m {
                            for mw in 0..m {
                                let (row, col) = ((bh * m + mh) as f32, (bw * m + mw) as f32);
                                angles.extend(self.inv_freq.iter().map(|f| row * f));
                                angles.extend(self.inv_freq.iter().map(|f| col * f));
                            }
                        }
                    }
                }
            }
        }
        let angles = Tensor::from_vec(angles, (total, nf * 2), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// The projections adapters may target (not the patch embedding).
    pub fn adaptable(&self) -> impl Iterator<Item = &Linear> {
        let blocks = self.blocks.iter().flat_map(|b| [&b.attn.qkv, &b.attn.proj, &b.fc1, &b.fc2]);
        blocks.chain([&self.merger.fc1, &self.merger.fc2])
    }

    pub fn merge_size(&self) -> usize {
        self.cfg.spatial_merge_size
    }
}
