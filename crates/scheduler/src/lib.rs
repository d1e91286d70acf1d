//! Continuous (iteration-level) batching over one Qwen2-VL model.
//!
//! [`Engine::start`] moves the model onto its own thread. Every step that thread admits waiting
//! requests (their prefill) and decodes one token for every running sequence, all in one
//! ragged forward pass; sequences leave as soon as they finish and new ones join at the next
//! step. Callers [`Engine::submit`] a request and read its [`Event`]s from a [`RequestStream`].

mod config;
mod engine;
mod kv_budget;
pub mod metrics;
mod request;
mod sequence;
mod vision_cache;

pub use config::EngineConfig;
pub use engine::Engine;
pub use metrics::Stats;
pub use qwen_ocr_model::Timings;
pub use request::{Completion, Event, Request, RequestStream, SubmitError};
