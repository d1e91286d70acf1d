//! Qwen3-VL's `vision_config`.

use serde::Deserialize;

use crate::families::Patches;

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawVisionConfig {
    depth: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_heads: usize,
    out_hidden_size: usize,
    num_position_embeddings: usize,
    #[serde(default)]
    deepstack_visual_indexes: Vec<usize>,
    #[serde(default = "default_act")]
    hidden_act: String,
}

fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub out_hidden_size: usize,
    /// Side of the learned position-embedding grid (`sqrt(num_position_embeddings)`).
    pub position_grid: usize,
    /// Blocks whose output feeds a DeepStack merger, in the order of the decoder layers they
    /// are added to.
    pub deepstack_visual_indexes: Vec<usize>,
    pub patches: Patches,
}

impl TryFrom<(RawVisionConfig, Patches)> for VisionConfig {
    type Error = String;

    fn try_from((raw, patches): (RawVisionConfig, Patches)) -> Result<Self, String> {
        patches.check()?;
        if raw.num_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_heads) || !(raw.hidden_size / raw.num_heads).is_multiple_of(4) {
            return Err("hidden_size / num_heads must be a multiple of 4".into());
        }
        if raw.hidden_act != "gelu_pytorch_tanh" {
            return Err(format!("hidden_act {:?}: Qwen3-VL's vision MLP uses gelu_pytorch_tanh", raw.hidden_act));
        }
        let position_grid = (raw.num_position_embeddings as f64).sqrt() as usize;
        if position_grid == 0 || position_grid * position_grid != raw.num_position_embeddings {
            return Err(format!("num_position_embeddings {} is not a square", raw.num_position_embeddings));
        }
        if let Some(&i) = raw.deepstack_visual_indexes.iter().find(|&&i| i >= raw.depth) {
            return Err(format!("deepstack_visual_indexes holds {i}, past depth {}", raw.depth));
        }
        Ok(Self {
            depth: raw.depth,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_heads: raw.num_heads,
            out_hidden_size: raw.out_hidden_size,
            position_grid,
            deepstack_visual_indexes: raw.deepstack_visual_indexes,
            patches,
        })
    }
}
