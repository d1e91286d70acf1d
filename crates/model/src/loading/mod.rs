//! Finding a checkpoint's files and reading its tensors (converted, or quantized and cached).

pub mod checkpoint;
pub mod quant_cache;
pub mod weights;
