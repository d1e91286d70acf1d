//! `/health` and `/ready`.

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
    pub engine: EngineStats,
}

/// A point-in-time view of the engine.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct EngineStats {
    pub queue_depth: usize,
    pub running: usize,
    pub last_batch_size: usize,
    pub kv_cache_used_bytes: usize,
    pub kv_cache_capacity_bytes: usize,
    pub generated_tokens: u64,
    pub vision_encodes: u64,
    pub vision_cache_hits: u64,
    pub steps: u64,
}

impl From<qwen_ocr_scheduler::Stats> for EngineStats {
    fn from(s: qwen_ocr_scheduler::Stats) -> Self {
        let qwen_ocr_scheduler::Stats {
            queue_depth,
            running,
            last_batch_size,
            kv_cache_used_bytes,
            kv_cache_capacity_bytes,
            generated_tokens,
            vision_encodes,
            vision_cache_hits,
            steps,
        } = s;
        Self {
            queue_depth,
            running,
            last_batch_size,
            kv_cache_used_bytes,
            kv_cache_capacity_bytes,
            generated_tokens,
            vision_encodes,
            vision_cache_hits,
            steps,
        }
    }
}
