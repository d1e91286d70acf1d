//! Qwen3-VL (dense): a vision tower with 16-pixel patches, learned position embeddings
//! interpolated to each image's grid on top of the 2D rotary, LayerNorm / gelu_tanh blocks and
//! DeepStack (features of `deepstack_visual_indexes` blocks, each through its own merger, added
//! to the first decoder layers' outputs at the image positions); the Qwen3 decoder (q/k
//! RMSNorm, no attention bias, explicit `head_dim`) with interleaved M-RoPE.

pub mod config;
mod position_embedding;
pub mod vision;

pub use config::VisionConfig;

use crate::config::PreprocessorConfig;

/// Qwen3-VL's image processor: 16-pixel patches (32-pixel merged tokens), mean and std 0.5,
/// and between 64 and 16384 merged tokens.
pub(crate) fn default_preprocessor() -> PreprocessorConfig {
    PreprocessorConfig {
        min_pixels: 65_536,
        max_pixels: 16_777_216,
        patch_size: 16,
        merge_size: 2,
        temporal_patch_size: 2,
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
    }
}
