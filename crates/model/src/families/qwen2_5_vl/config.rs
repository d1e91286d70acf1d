//! Qwen2.5-VL's `vision_config`.

use serde::Deserialize;

use crate::families::Patches;

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawVisionConfig {
    depth: usize,
    /// The tower's width (Qwen2-VL called it `embed_dim`).
    hidden_size: usize,
    intermediate_size: usize,
    num_heads: usize,
    out_hidden_size: usize,
    window_size: usize,
    #[serde(default)]
    fullatt_block_indexes: Vec<usize>,
    #[serde(default = "default_act")]
    hidden_act: String,
}

fn default_act() -> String {
    "silu".into()
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub out_hidden_size: usize,
    /// Side of an attention window, in pixels of the resized image.
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub patches: Patches,
}

impl VisionConfig {
    /// Side of an attention window in merged tokens.
    pub fn window_tokens(&self) -> usize {
        self.window_size / self.patches.spatial_merge_size / self.patches.patch_size
    }
}

impl TryFrom<(RawVisionConfig, Patches)> for VisionConfig {
    type Error = String;

    fn try_from((raw, patches): (RawVisionConfig, Patches)) -> Result<Self, String> {
        patches.check()?;
        if raw.num_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_heads) || !(raw.hidden_size / raw.num_heads).is_multiple_of(4) {
            return Err("hidden_size / num_heads must be a multiple of 4".into());
        }
        if raw.hidden_act != "silu" {
            return Err(format!("hidden_act {:?}: Qwen2.5-VL's vision MLP is silu-gated", raw.hidden_act));
        }
        if let Some(&i) = raw.fullatt_block_indexes.iter().find(|&&i| i >= raw.depth) {
            return Err(format!("fullatt_block_indexes holds {i}, past depth {}", raw.depth));
        }
        let config = Self {
            depth: raw.depth,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_heads: raw.num_heads,
            out_hidden_size: raw.out_hidden_size,
            window_size: raw.window_size,
            fullatt_block_indexes: raw.fullatt_block_indexes,
            patches,
        };
        if config.window_tokens() == 0 {
            return Err(format!("window_size {} is smaller than one merged token", config.window_size));
        }
        Ok(config)
    }
}
