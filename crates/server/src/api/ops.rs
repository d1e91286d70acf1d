//! `/health` and `/ready`.

use qwen_ocr_scheduler::Stats;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Ready {
    /// Always `ready`.
    pub status: String,
    /// The served checkpoint.
    pub model: String,
    /// Its architecture (`config.json`'s `model_type`: `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`).
    pub architecture: String,
    pub engine: Stats,
}
