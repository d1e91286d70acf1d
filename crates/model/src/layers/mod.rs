//! Layers every family shares: the one `Linear` (base weights, quantization, per-row LoRA), the
//! norms, the KV cache and the M-RoPE decoder.

pub mod decoder;
pub mod kv_cache;
pub mod linear;
pub mod norm;
pub mod quant;
