//! Continuous batching of requests over one model (issue: scheduler). The model crate already
//! exposes the ragged-batch forward pass (`qwen_ocr_model::text::SeqInput`, one KV cache per
//! sequence) that this crate's engine loop will drive.
