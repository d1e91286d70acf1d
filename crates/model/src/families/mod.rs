//! One folder per model family: what differs between Qwen2-VL, Qwen2.5-VL and Qwen3-VL. Each
//! family brings a serde config for its vision tower, the tower itself (behind
//! [`VisionTower`]), and the few facts about its decoder that differ; the decoder, the
//! projections, norms and kernels are shared (`crate::layers`).
//!
//! Adding a family: a folder with `config.rs` and `vision.rs`, an arm in [`Family`] (its
//! `model_type`, architecture and defaults) and one in [`VisionConfig`].

pub mod qwen2_5_vl;
pub mod qwen2_vl;
pub mod qwen3_vl;
mod shared;

use candle_core::{Result as CandleResult, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::adapters::lora::LoraAdapter;
use crate::config::{MropeLayout, PreprocessorConfig, TextConfig};
use crate::layers::linear::Linear;
use crate::loading::weights::Loader;

/// The architectures qwen-ocr runs, named by `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Qwen2VL,
    Qwen2_5VL,
    Qwen3VL,
}

impl Family {
    pub const ALL: [Family; 3] = [Family::Qwen2VL, Family::Qwen2_5VL, Family::Qwen3VL];

    /// `config.json`'s `model_type`, also the name `/v1/models` and `/ready` report.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen2VL => "qwen2_vl",
            Family::Qwen2_5VL => "qwen2_5_vl",
            Family::Qwen3VL => "qwen3_vl",
        }
    }

    /// transformers' class, as `config.json`'s `architectures` names it.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Qwen2VL => "Qwen2VLForConditionalGeneration",
            Family::Qwen2_5VL => "Qwen2_5_VLForConditionalGeneration",
            Family::Qwen3VL => "Qwen3VLForConditionalGeneration",
        }
    }

    /// From `model_type`, else from `architectures`; never from the checkpoint's name.
    pub fn detect(model_type: Option<&str>, architectures: &[String]) -> Result<Self, String> {
        let by_type = model_type.and_then(|t| Self::ALL.into_iter().find(|f| f.model_type() == t));
        let by_class = || architectures.iter().find_map(|a| Self::ALL.into_iter().find(|f| f.architecture() == a));
        by_type.or_else(by_class).ok_or_else(|| {
            let supported: Vec<String> = Self::ALL.iter().map(|f| format!("{} ({})", f.model_type(), f.architecture())).collect();
            format!(
                "unsupported architecture: model_type {:?}, architectures {:?}; qwen-ocr runs {}",
                model_type.unwrap_or("(none)"),
                architectures,
                supported.join(", ")
            )
        })
    }

    pub(crate) fn vision_config(self, node: Value) -> Result<VisionConfig, String> {
        use crate::config::from_value;
        // Every family's vision config has the patch fields; each parse names what did not fit.
        let patches: Patches = from_value(node.clone())?;
        Ok(match self {
            Family::Qwen2VL => VisionConfig::Qwen2VL((from_value(node)?, patches).try_into()?),
            Family::Qwen2_5VL => VisionConfig::Qwen2_5VL((from_value(node)?, patches).try_into()?),
            Family::Qwen3VL => VisionConfig::Qwen3VL((from_value(node)?, patches).try_into()?),
        })
    }

    /// The decoder's family-specific facts, checked against its config.
    pub(crate) fn check_text(self, text: &TextConfig) -> Result<(), String> {
        if self != Family::Qwen3VL && text.head_dim * text.num_attention_heads != text.hidden_size {
            return Err(format!(
                "head_dim {} x {} heads must equal hidden_size {}",
                text.head_dim, text.num_attention_heads, text.hidden_size
            ));
        }
        Ok(())
    }

    /// How the decoder's rotary frequencies follow the (t, h, w) position rows.
    pub fn mrope_layout(self) -> MropeLayout {
        match self {
            Family::Qwen2VL | Family::Qwen2_5VL => MropeLayout::Chunked,
            Family::Qwen3VL => MropeLayout::Interleaved,
        }
    }

    /// The decoder as this family builds it.
    pub(crate) fn decoder_spec(self, text: &TextConfig, vision: &VisionConfig) -> DecoderSpec {
        match self {
            // Qwen2: biased q/k/v, unbiased o.
            Family::Qwen2VL | Family::Qwen2_5VL => {
                DecoderSpec { qkv_bias: text.attention_bias.unwrap_or(true), o_bias: false, qk_norm: false, deepstack_layers: 0 }
            }
            // Qwen3: one `attention_bias` for all four (false as published), RMSNorm on each
            // head's q and k.
            Family::Qwen3VL => {
                let bias = text.attention_bias.unwrap_or(false);
                DecoderSpec { qkv_bias: bias, o_bias: bias, qk_norm: true, deepstack_layers: vision.deepstack_layers() }
            }
        }
    }

    /// The image processor's values where `preprocessor_config.json` is silent (or absent).
    pub fn default_preprocessor(self) -> PreprocessorConfig {
        match self {
            Family::Qwen2VL | Family::Qwen2_5VL => PreprocessorConfig::default(),
            Family::Qwen3VL => qwen3_vl::default_preprocessor(),
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// What differs between the families' decoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderSpec {
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// RMSNorm over each head of q and k before the rotary (Qwen3).
    pub qk_norm: bool,
    /// How many decoder layers get DeepStack features added after them (Qwen3-VL).
    pub deepstack_layers: usize,
}

/// How an image becomes patches: the same fields in every family's vision config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Patches {
    #[serde(default = "Patches::default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "Patches::default_merge_size")]
    pub spatial_merge_size: usize,
    #[serde(default = "Patches::default_temporal_patch_size")]
    pub temporal_patch_size: usize,
    /// Published Qwen2-VL configs say `in_chans`, transformers 5 writes `in_channels`.
    #[serde(default)]
    in_chans: Option<usize>,
    #[serde(default)]
    in_channels: Option<usize>,
}

impl Patches {
    fn default_patch_size() -> usize {
        14
    }
    fn default_merge_size() -> usize {
        2
    }
    fn default_temporal_patch_size() -> usize {
        2
    }

    pub fn channels(&self) -> usize {
        self.in_channels.or(self.in_chans).unwrap_or(3)
    }

    /// Values in one flattened patch: channels x frames x patch x patch.
    pub fn patch_len(&self) -> usize {
        self.channels() * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches merged into one visual token.
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if self.patch_size == 0 || self.spatial_merge_size == 0 || self.temporal_patch_size == 0 || self.channels() == 0 {
            return Err("patch_size, spatial_merge_size, temporal_patch_size and in_channels must be positive".into());
        }
        Ok(())
    }
}

/// Each family's vision configuration: the arm picks the tower.
#[derive(Debug, Clone, PartialEq)]
pub enum VisionConfig {
    Qwen2VL(qwen2_vl::VisionConfig),
    Qwen2_5VL(qwen2_5_vl::VisionConfig),
    Qwen3VL(qwen3_vl::VisionConfig),
}

impl VisionConfig {
    pub fn patches(&self) -> &Patches {
        match self {
            VisionConfig::Qwen2VL(c) => &c.patches,
            VisionConfig::Qwen2_5VL(c) => &c.patches,
            VisionConfig::Qwen3VL(c) => &c.patches,
        }
    }

    /// Width of the merger's output, which must equal the decoder's hidden size.
    pub fn out_hidden_size(&self) -> usize {
        match self {
            VisionConfig::Qwen2VL(c) => c.hidden_size,
            VisionConfig::Qwen2_5VL(c) => c.out_hidden_size,
            VisionConfig::Qwen3VL(c) => c.out_hidden_size,
        }
    }

    pub fn deepstack_layers(&self) -> usize {
        match self {
            VisionConfig::Qwen3VL(c) => c.deepstack_visual_indexes.len(),
            _ => 0,
        }
    }

    pub(crate) fn load(&self, vb: Loader) -> CandleResult<Box<dyn VisionTower>> {
        Ok(match self {
            VisionConfig::Qwen2VL(c) => Box::new(qwen2_vl::vision::VisionTower::load(vb, c)?),
            VisionConfig::Qwen2_5VL(c) => Box::new(qwen2_5_vl::vision::VisionTower::load(vb, c)?),
            VisionConfig::Qwen3VL(c) => Box::new(qwen3_vl::vision::VisionTower::load(vb, c)?),
        })
    }
}

/// One image's output of the vision tower.
#[derive(Debug, Clone)]
pub struct VisualEmbeds {
    /// `[visual tokens, hidden]`: what replaces the image's placeholder tokens.
    pub embeds: Tensor,
    /// Qwen3-VL's DeepStack: one `[visual tokens, hidden]` tensor per early decoder layer, added
    /// to that layer's output at the image's positions. Empty for the other families.
    pub deepstack: Vec<Tensor>,
}

/// A family's vision tower: images in (concatenated flattened patches with each image's grid
/// and adapter), one [`VisualEmbeds`] per image out.
pub trait VisionTower: Send + Sync {
    fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]], adapters: &[Option<&LoraAdapter>]) -> CandleResult<Vec<VisualEmbeds>>;

    /// The projections adapters may target.
    fn adaptable(&self) -> Vec<&Linear>;
}
