//! The Qwen2.5-VL vision tower: patch embedding, RMSNorm blocks with a silu-gated MLP that
//! attend within windows (full attention at `fullatt_block_indexes`), an RMSNorm merger, and
//! the tokens put back in the processor's order.

use candle_core::{Result, Tensor};

use super::windows::Windows;
use super::VisionConfig;
use crate::adapters::lora::LoraAdapter;
use crate::families::shared::{self, ImageRows, PatchMerger, Rotary, VisionAttention, VisionBlock, VisionMlp, VISION_NORM_EPS};
use crate::families::{Patches, VisualEmbeds};
use crate::layers::linear::Linear;
use crate::layers::norm::{Norm, RmsNorm};
use crate::loading::weights::Loader;

/// The published vision rotary base.
const ROPE_THETA: f64 = 10_000.0;

pub struct VisionTower {
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    /// Per block: attend within the whole image rather than within windows.
    full_attention: Vec<bool>,
    merger: PatchMerger,
    inv_freq: Vec<f32>,
    window_tokens: usize,
    patches: Patches,
}

impl VisionTower {
    pub fn load(vb: Loader, cfg: &VisionConfig) -> Result<Self> {
        let (width, inner) = (cfg.hidden_size, cfg.intermediate_size);
        let rms_norm = |vb: Loader| -> Result<Norm> { Ok(Norm::Rms(RmsNorm::load(vb, width, VISION_NORM_EPS)?)) };
        let blocks = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(VisionBlock {
                    norm1: rms_norm(vb.pp("norm1"))?,
                    norm2: rms_norm(vb.pp("norm2"))?,
                    attn: VisionAttention::load(vb.pp("attn"), width, cfg.num_heads)?,
                    mlp: VisionMlp::Gated {
                        gate: Linear::load(vb.pp("mlp.gate_proj"), width, inner, true)?,
                        up: Linear::load(vb.pp("mlp.up_proj"), width, inner, true)?,
                        down: Linear::load(vb.pp("mlp.down_proj"), inner, width, true)?,
                    },
                })
            })
            .collect::<Result<_>>()?;
        let group = width * cfg.patches.merge_unit();
        let merger = PatchMerger {
            norm: rms_norm(vb.pp("merger.ln_q"))?,
            norm_after_grouping: false,
            fc1: Linear::load(vb.pp("merger.mlp.0"), group, group, true)?,
            fc2: Linear::load(vb.pp("merger.mlp.2"), group, cfg.out_hidden_size, true)?,
            group,
        };
        Ok(Self {
            patch_embed: shared::patch_embed(&vb, width, cfg.patches.patch_len(), false)?,
            blocks,
            full_attention: (0..cfg.depth).map(|i| cfg.fullatt_block_indexes.contains(&i)).collect(),
            merger,
            inv_freq: Rotary::inv_freq(width / cfg.num_heads, ROPE_THETA),
            window_tokens: cfg.window_tokens(),
            patches: cfg.patches.clone(),
        })
    }
}

impl crate::families::VisionTower for VisionTower {
    fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]], adapters: &[Option<&LoraAdapter>]) -> Result<Vec<VisualEmbeds>> {
        let device = pixels.device();
        let unit = self.patches.merge_unit();
        let windows = Windows::new(grids, self.patches.spatial_merge_size, self.window_tokens);
        // Window order moves whole merge groups and never leaves an image, so each image's
        // rows (and each frame's) stay where they were.
        let patch_order: Vec<u32> = windows.order.iter().flat_map(|&t| (t * unit..(t + 1) * unit).map(|p| p as u32)).collect();
        let patch_order = Tensor::new(patch_order, device)?;
        let window_spans: Vec<(usize, usize)> = windows.spans.iter().map(|&(s, n)| (s * unit, n * unit)).collect();

        let rows = ImageRows::new(grids, adapters, unit);
        let rotary = Rotary::new(grids, self.patches.spatial_merge_size, &self.inv_freq, device)?.select(&patch_order)?;
        let mut x = self.patch_embed.project(pixels, &rows.patches)?.index_select(&patch_order, 0)?;
        for (block, &full) in self.blocks.iter().zip(&self.full_attention) {
            let spans = if full { &rows.frames } else { &window_spans };
            x = block.forward(&x, &rotary, spans, &rows.patches)?;
        }
        let merged = self.merger.forward(&x, &rows.merged)?;
        let restore = Tensor::new(windows.inverse().into_iter().map(|i| i as u32).collect::<Vec<_>>(), device)?;
        let merged = merged.index_select(&restore, 0)?;
        Ok(rows.split(&merged)?.into_iter().map(|embeds| VisualEmbeds { embeds, deepstack: Vec::new() }).collect())
    }

    fn adaptable(&self) -> Vec<&Linear> {
        shared::adaptable(&self.blocks, [&self.merger])
    }
}
