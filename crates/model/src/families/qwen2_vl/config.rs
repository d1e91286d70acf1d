//! Qwen2-VL's `vision_config`.

use serde::Deserialize;

use crate::families::Patches;

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawVisionConfig {
    depth: usize,
    embed_dim: usize,
    num_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    mlp_ratio: f64,
    hidden_size: usize,
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
}

/// transformers 5 writes the rotary base here; the published configs leave it at 10000.
#[derive(Debug, Clone, Deserialize)]
struct RopeParameters {
    #[serde(default)]
    rope_theta: Option<f64>,
}

fn default_mlp_ratio() -> f64 {
    4.0
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    pub mlp_hidden: usize,
    /// Width of the merger's output, the decoder's hidden size.
    pub hidden_size: usize,
    pub patches: Patches,
    pub rope_theta: f64,
}

impl TryFrom<(RawVisionConfig, Patches)> for VisionConfig {
    type Error = String;

    fn try_from((raw, patches): (RawVisionConfig, Patches)) -> Result<Self, String> {
        patches.check()?;
        if raw.num_heads == 0 || !raw.embed_dim.is_multiple_of(raw.num_heads) || !(raw.embed_dim / raw.num_heads).is_multiple_of(4) {
            return Err("embed_dim / num_heads must be a multiple of 4".into());
        }
        Ok(Self {
            depth: raw.depth,
            embed_dim: raw.embed_dim,
            num_heads: raw.num_heads,
            mlp_hidden: (raw.embed_dim as f64 * raw.mlp_ratio) as usize,
            hidden_size: raw.hidden_size,
            patches,
            rope_theta: raw.rope_parameters.and_then(|r| r.rope_theta).unwrap_or(10_000.0),
        })
    }
}
