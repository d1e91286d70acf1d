//! The Qwen2-VL vision tower: patch embedding, LayerNorm blocks with 2D rotary attention over
//! each whole image and a quick_gelu MLP, and the patch merger.

use candle_core::{Result, Tensor};

use super::VisionConfig;
use crate::adapters::lora::LoraAdapter;
use crate::families::shared::{self, ImageRows, PatchMerger, Rotary, VisionAttention, VisionBlock, VisionMlp, VISION_NORM_EPS};
use crate::families::{Patches, VisualEmbeds};
use crate::kernels::fused::Activation;
use crate::layers::linear::Linear;
use crate::layers::norm::{LayerNorm, Norm};
use crate::loading::weights::Loader;

pub struct VisionTower {
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    inv_freq: Vec<f32>,
    patches: Patches,
}

impl VisionTower {
    pub fn load(vb: Loader, cfg: &VisionConfig) -> Result<Self> {
        let width = cfg.embed_dim;
        let layer_norm = |vb: Loader| -> Result<Norm> { Ok(Norm::Layer(LayerNorm::load(vb, width, VISION_NORM_EPS)?)) };
        let blocks = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(VisionBlock {
                    norm1: layer_norm(vb.pp("norm1"))?,
                    norm2: layer_norm(vb.pp("norm2"))?,
                    attn: VisionAttention::load(vb.pp("attn"), width, cfg.num_heads)?,
                    mlp: VisionMlp::Plain {
                        fc1: Linear::load(vb.pp("mlp.fc1"), width, cfg.mlp_hidden, true)?,
                        fc2: Linear::load(vb.pp("mlp.fc2"), cfg.mlp_hidden, width, true)?,
                        act: Activation::QuickGelu,
                    },
                })
            })
            .collect::<Result<_>>()?;
        let group = width * cfg.patches.merge_unit();
        let merger = PatchMerger {
            norm: layer_norm(vb.pp("merger.ln_q"))?,
            norm_after_grouping: false,
            fc1: Linear::load(vb.pp("merger.mlp.0"), group, group, true)?,
            fc2: Linear::load(vb.pp("merger.mlp.2"), group, cfg.hidden_size, true)?,
            group,
        };
        Ok(Self {
            patch_embed: shared::patch_embed(&vb, width, cfg.patches.patch_len(), false)?,
            blocks,
            merger,
            inv_freq: Rotary::inv_freq(width / cfg.num_heads, cfg.rope_theta),
            patches: cfg.patches.clone(),
        })
    }
}

impl crate::families::VisionTower for VisionTower {
    fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]], adapters: &[Option<&LoraAdapter>]) -> Result<Vec<VisualEmbeds>> {
        let rotary = Rotary::new(grids, self.patches.spatial_merge_size, &self.inv_freq, pixels.device())?;
        let rows = ImageRows::new(grids, adapters, self.patches.merge_unit());
        let mut x = self.patch_embed.project(pixels, &rows.patches)?;
        for block in &self.blocks {
            x = block.forward(&x, &rotary, &rows.frames, &rows.patches)?;
        }
        let merged = self.merger.forward(&x, &rows.merged)?;
        Ok(rows.split(&merged)?.into_iter().map(|embeds| VisualEmbeds { embeds, deepstack: Vec::new() }).collect())
    }

    fn adaptable(&self) -> Vec<&Linear> {
        shared::adaptable(&self.blocks, [&self.merger])
    }
}
