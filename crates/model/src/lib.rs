//! Qwen-VL models on candle: checkpoints, image preprocessing, prompts, the families' forward
//! passes and generation.

pub mod adapters;
pub mod config;
pub mod decoding;
pub mod error;
pub mod families;
pub mod json_fields;
pub mod kernels;
pub mod layers;
pub mod loading;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod quality;
pub mod schema;
pub mod stage_profile;

pub use candle_core::{DType, Device};
pub use decoding::sequence::{Phase, Sequence};
pub use error::{Error, ImageError, Result};
pub use families::{Family, VisualEmbeds};
pub use layers::quant::Quant;
pub use model::LoadOptions;
pub use pipeline::{FinishReason, GenerateOutput, GenerateRequest, Pipeline, PreparedPrompt, Timings};
