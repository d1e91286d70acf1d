//! Qwen2.5-VL: an RMSNorm / SwiGLU vision tower whose blocks attend within windows of the image
//! (tokens reordered window by window, restored after the merger) except at
//! `fullatt_block_indexes`, and the Qwen2 decoder with chunked M-RoPE.

pub mod config;
pub mod vision;
mod windows;

pub use config::VisionConfig;
