//! One request's state inside the engine.

use std::time::{Duration, Instant};

use qwen_ocr_model::decoding::Decoding;
use qwen_ocr_model::generate::ms;
use qwen_ocr_model::kv_cache::KvCache;
use qwen_ocr_model::{FinishReason, GenerateRequest, Pipeline, PreparedPrompt, Timings};
use tokio::sync::mpsc;

use crate::request::{Completion, Event};

pub struct Sequence {
    pub request: GenerateRequest,
    pub deadline: Option<Instant>,
    pub prompt: PreparedPrompt,
    pub decoding: Decoding,
    pub cache: KvCache,
    pub events: mpsc::UnboundedSender<Event>,
    pub submitted: Instant,
    pub admitted: Option<Instant>,
    pub first_token: Option<Instant>,
    /// Time in the vision tower during prefill (part of the prefill time).
    pub vision: Duration,
    pub error: Option<String>,
}

impl Sequence {
    /// Tokens this sequence may ever hold in its cache: what its budget reservation covers.
    pub fn max_tokens(&self) -> usize {
        self.prompt.ids.len() + self.prompt.max_new
    }

    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    pub fn is_finished(&self) -> bool {
        self.decoding.finish_reason().is_some()
    }

    /// Ends the sequence early unless it already finished.
    pub fn end(&mut self, reason: FinishReason, error: Option<String>) {
        if !self.is_finished() {
            self.decoding.end(reason);
            self.error = error;
        }
    }

    /// Sends the final event (the receiver may be gone: then nobody is listening).
    pub fn complete(mut self, pipeline: &Pipeline) {
        // Released before the answer goes out: a client holding its answer never finds its
        // adapter still counted as in use (the registry evicts only adapters nobody holds).
        self.request.adapter = None;
        let now = Instant::now();
        let finish_reason = self.decoding.finish_reason().unwrap_or(FinishReason::Error);
        let (text, tail, error) = match self.decoding.final_text(pipeline.prompt.tokenizer()) {
            Ok((text, tail)) => (text, tail, self.error),
            Err(e) => (String::new(), String::new(), Some(e.to_string())),
        };
        let admitted = self.admitted.unwrap_or(now);
        let first_token = self.first_token.unwrap_or(now);
        let timings = Timings {
            queued_ms: ms(admitted - self.submitted),
            prefill_ms: ms(first_token.saturating_duration_since(admitted)),
            vision_ms: ms(self.vision),
            decode_ms: ms(now.saturating_duration_since(first_token)),
        };
        let _ = self.events.send(Event::Done(Completion {
            text,
            tail,
            token_ids: self.decoding.generated().to_vec(),
            logprobs: self.decoding.logprobs().to_vec(),
            finish_reason,
            error,
            prompt_tokens: self.prompt.ids.len(),
            image_grid_thw: self.request.images.iter().map(|i| i.grid_thw).collect(),
            timings,
        }));
    }
}
