//! Qwen2-VL on candle: checkpoints, image preprocessing, prompts, the model and generation.

pub mod adapter_registry;
pub mod amx;
pub mod checkpoint;
pub mod color_key;
pub mod config;
pub mod cpu_kernels;
pub mod decoding;
pub mod detokenize;
pub mod error;
pub mod generate;
pub mod grammar;
pub mod image;
pub mod kv_cache;
pub mod linear;
pub mod logits;
pub mod logprobs;
pub mod lora;
pub mod merge;
pub mod model;
pub mod norm;
pub mod positions;
pub mod prompt;
pub mod q8;
pub mod quality;
pub mod quant;
pub mod quant_cache;
pub mod sampling;
pub mod text;
pub mod threads;
pub mod vision;
pub mod weights;

pub use candle_core::{DType, Device};
pub use error::{Error, ImageError, Result};
pub use generate::{ActiveSequence, FinishReason, GenerateOutput, GenerateRequest, Pipeline, PreparedPrompt, Timings};
pub use model::LoadOptions;
pub use quant::Quant;
