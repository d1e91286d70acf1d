//! The engine's limits, with the defaults the server documents.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_batch_size: usize,
    /// Requests waiting for admission; beyond it `submit` refuses at once.
    pub max_queue: usize,
    /// Prompt tokens admitted per step, so a burst of prefills does not stall running decodes.
    /// A single longer prompt is still admitted, alone, so it cannot starve.
    pub max_prefill_tokens: usize,
    /// Key/value cache memory shared by all running sequences. Each reserves room for its
    /// prompt and its token limit at admission, so it never runs out mid-generation.
    pub kv_cache_bytes: usize,
    /// Encoded images kept for reuse (least recently used go first).
    pub vision_cache_entries: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_batch_size: 32, max_queue: 256, max_prefill_tokens: 8192, kv_cache_bytes: 4 << 30, vision_cache_entries: 64 }
    }
}
