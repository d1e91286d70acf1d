//! The Qwen3-VL vision tower: a biased patch embedding plus interpolated position embeddings,
//! LayerNorm blocks with 2D rotary attention over each image and a gelu_tanh MLP, DeepStack
//! mergers on the outputs of chosen blocks, and the final merger.

use candle_core::{Result, Tensor};

use super::position_embedding;
use super::VisionConfig;
use crate::adapters::lora::LoraAdapter;
use crate::families::shared::{self, ImageRows, PatchMerger, Rotary, VisionAttention, VisionBlock, VisionMlp, VISION_NORM_EPS};
use crate::families::{Patches, VisualEmbeds};
use crate::kernels::fused::Activation;
use crate::layers::linear::Linear;
use crate::layers::norm::{LayerNorm, Norm};
use crate::loading::weights::Loader;

/// The published vision rotary base.
const ROPE_THETA: f64 = 10_000.0;

pub struct VisionTower {
    patch_embed: Linear,
    /// The learned position table `[grid * grid, width]`, as f32 on the host: each image
    /// interpolates its own rows from it.
    position_table: Vec<f32>,
    position_grid: usize,
    blocks: Vec<VisionBlock>,
    /// `(block index, merger)`: the merger runs on that block's output.
    deepstack: Vec<(usize, PatchMerger)>,
    merger: PatchMerger,
    inv_freq: Vec<f32>,
    width: usize,
    patches: Patches,
}

impl VisionTower {
    pub fn load(vb: Loader, cfg: &VisionConfig) -> Result<Self> {
        let (width, inner) = (cfg.hidden_size, cfg.intermediate_size);
        let group = width * cfg.patches.merge_unit();
        let layer_norm = |vb: Loader, size: usize| -> Result<Norm> { Ok(Norm::Layer(LayerNorm::load(vb, size, VISION_NORM_EPS)?)) };
        let blocks = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(VisionBlock {
                    norm1: layer_norm(vb.pp("norm1"), width)?,
                    norm2: layer_norm(vb.pp("norm2"), width)?,
                    attn: VisionAttention::load(vb.pp("attn"), width, cfg.num_heads)?,
                    mlp: VisionMlp::Plain {
                        fc1: Linear::load(vb.pp("mlp.linear_fc1"), width, inner, true)?,
                        fc2: Linear::load(vb.pp("mlp.linear_fc2"), inner, width, true)?,
                        act: Activation::GeluTanh,
                    },
                })
            })
            .collect::<Result<_>>()?;
        let merger = |vb: Loader, norm_after_grouping: bool| -> Result<PatchMerger> {
            Ok(PatchMerger {
                norm: layer_norm(vb.pp("norm"), if norm_after_grouping { group } else { width })?,
                norm_after_grouping,
                fc1: Linear::load(vb.pp("linear_fc1"), group, group, true)?,
                fc2: Linear::load(vb.pp("linear_fc2"), group, cfg.out_hidden_size, true)?,
                group,
            })
        };
        let deepstack = cfg
            .deepstack_visual_indexes
            .iter()
            .enumerate()
            .map(|(k, &block)| Ok((block, merger(vb.pp(format!("deepstack_merger_list.{k}")), true)?)))
            .collect::<Result<_>>()?;
        let positions = cfg.position_grid * cfg.position_grid;
        let position_table =
            vb.get((positions, width), "pos_embed.weight")?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self {
            patch_embed: shared::patch_embed(&vb, width, cfg.patches.patch_len(), true)?,
            position_table,
            position_grid: cfg.position_grid,
            blocks,
            deepstack,
            merger: merger(vb.pp("merger"), false)?,
            inv_freq: Rotary::inv_freq(width / cfg.num_heads, ROPE_THETA),
            width,
            patches: cfg.patches.clone(),
        })
    }

    /// Every image's interpolated position embeddings, in the patches' order.
    fn position_embeds(&self, grids: &[[usize; 3]], like: &Tensor) -> Result<Tensor> {
        let merge = self.patches.spatial_merge_size;
        let values: Vec<f32> = grids
            .iter()
            .flat_map(|&g| position_embedding::interpolate(&self.position_table, self.width, self.position_grid, g, merge))
            .collect();
        let rows = values.len() / self.width;
        Tensor::from_vec(values, (rows, self.width), like.device())?.to_dtype(like.dtype())
    }
}

impl crate::families::VisionTower for VisionTower {
    fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]], adapters: &[Option<&LoraAdapter>]) -> Result<Vec<VisualEmbeds>> {
        let rotary = Rotary::new(grids, self.patches.spatial_merge_size, &self.inv_freq, pixels.device())?;
        let rows = ImageRows::new(grids, adapters, self.patches.merge_unit());
        let x = self.patch_embed.project(pixels, &rows.patches)?;
        let mut x = (&x + self.position_embeds(grids, &x)?)?;
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &rotary, &rows.frames, &rows.patches)?;
            for (_, merger) in self.deepstack.iter().filter(|(b, _)| *b == i) {
                deepstack.push(rows.split(&merger.forward(&x, &rows.merged)?)?);
            }
        }
        let embeds = rows.split(&self.merger.forward(&x, &rows.merged)?)?;
        Ok(embeds
            .into_iter()
            .enumerate()
            .map(|(image, embeds)| VisualEmbeds { embeds, deepstack: deepstack.iter().map(|layer| layer[image].clone()).collect() })
            .collect())
    }

    fn adaptable(&self) -> Vec<&Linear> {
        shared::adaptable(&self.blocks, self.deepstack.iter().map(|(_, m)| m).chain([&self.merger]))
    }
}
