//! Qwen2-VL: a LayerNorm / quick_gelu vision tower with full attention within each image, and
//! the Qwen2 decoder with chunked M-RoPE.

pub mod config;
pub mod vision;

pub use config::VisionConfig;
