//! Metrics hooks: the engine reports through the `metrics` facade under these names (the
//! application installs the recorder, e.g. a Prometheus exporter), and keeps a snapshot for
//! callers that ask directly.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use qwen_ocr_model::stage_profile;
use serde::{Deserialize, Serialize};

pub const QUEUE_DEPTH: &str = "qwen_ocr_queue_depth";
pub const RUNNING_SEQUENCES: &str = "qwen_ocr_running_sequences";
pub const BATCH_SIZE: &str = "qwen_ocr_batch_size";
pub const STEP_SECONDS: &str = "qwen_ocr_step_duration_seconds";
pub const PROMPT_TOKENS: &str = "qwen_ocr_prompt_tokens_total";
pub const GENERATED_TOKENS: &str = "qwen_ocr_generated_tokens_total";
pub const KV_CACHE_USED_BYTES: &str = "qwen_ocr_kv_cache_used_bytes";
pub const KV_CACHE_CAPACITY_BYTES: &str = "qwen_ocr_kv_cache_capacity_bytes";
pub const VISION_CACHE_HITS: &str = "qwen_ocr_vision_cache_hits_total";
pub const VISION_CACHE_MISSES: &str = "qwen_ocr_vision_cache_misses_total";
pub const FINISHED: &str = "qwen_ocr_sequences_finished_total";
/// The model's stage profile (`QWEN_OCR_STAGE_PROFILE=1`), by `phase` and `op` label.
pub const STAGE_MICROSECONDS: &str = "qwen_ocr_stage_microseconds_total";
pub const STAGE_CALLS: &str = "qwen_ocr_stage_calls_total";

/// Copies the model's stage profile into the metrics, when it is on. The model keeps its own
/// running totals (it does not depend on the `metrics` facade), so the counters are set to
/// them rather than incremented.
pub(crate) fn publish_stage_profile() {
    if !stage_profile::enabled() {
        return;
    }
    for total in stage_profile::totals() {
        metrics::counter!(STAGE_MICROSECONDS, "phase" => total.phase, "op" => total.op).absolute(total.nanos / 1000);
        metrics::counter!(STAGE_CALLS, "phase" => total.phase, "op" => total.op).absolute(total.calls);
    }
}

/// A point-in-time view of the engine.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Stats {
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

/// Shared between the engine thread (writer) and handles (readers).
#[derive(Default)]
pub(crate) struct SharedStats {
    pub queue_depth: AtomicUsize,
    pub running: AtomicUsize,
    pub last_batch_size: AtomicUsize,
    pub kv_cache_used_bytes: AtomicUsize,
    pub kv_cache_capacity_bytes: AtomicUsize,
    pub generated_tokens: AtomicU64,
    pub vision_encodes: AtomicU64,
    pub vision_cache_hits: AtomicU64,
    pub steps: AtomicU64,
}

impl SharedStats {
    pub fn snapshot(&self) -> Stats {
        let r = Ordering::Relaxed;
        Stats {
            queue_depth: self.queue_depth.load(r),
            running: self.running.load(r),
            last_batch_size: self.last_batch_size.load(r),
            kv_cache_used_bytes: self.kv_cache_used_bytes.load(r),
            kv_cache_capacity_bytes: self.kv_cache_capacity_bytes.load(r),
            generated_tokens: self.generated_tokens.load(r),
            vision_encodes: self.vision_encodes.load(r),
            vision_cache_hits: self.vision_cache_hits.load(r),
            steps: self.steps.load(r),
        }
    }
}
