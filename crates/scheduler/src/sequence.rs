//! One request inside the engine: the model's [`Sequence`] plus what the engine adds around it
//! (its deadline, where its events go, and when each stage began).

use std::time::{Duration, Instant};

use qwen_ocr_model::pipeline::ms;
use qwen_ocr_model::{FinishReason, Pipeline, Sequence, Timings};
use tokio::sync::mpsc;

use crate::request::{Completion, Event};

pub struct EngineSequence {
    pub seq: Sequence,
    pub deadline: Option<Instant>,
    pub events: mpsc::UnboundedSender<Event>,
    pub submitted: Instant,
    pub admitted: Option<Instant>,
    pub first_token: Option<Instant>,
    /// Time in the vision tower during prefill (part of the prefill time).
    pub vision: Duration,
    pub error: Option<String>,
}

impl EngineSequence {
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    pub fn is_finished(&self) -> bool {
        self.seq.is_finished()
    }

    /// Ends the sequence early unless it already finished.
    pub fn end(&mut self, reason: FinishReason, error: Option<String>) {
        if !self.is_finished() {
            self.seq.decoding.end(reason);
            self.error = error;
        }
    }

    /// Sends the final event (the receiver may be gone: then nobody is listening).
    pub fn complete(mut self, pipeline: &Pipeline) {
        // Released before the answer goes out: a client holding its answer never finds its
        // adapter still counted as in use (the registry evicts only adapters nobody holds).
        self.seq.adapter = None;
        let now = Instant::now();
        let decoding = &self.seq.decoding;
        let finish_reason = decoding.finish_reason().unwrap_or(FinishReason::Error);
        let (text, tail, error) = match decoding.final_text(pipeline.prompt.tokenizer()) {
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
            token_ids: decoding.generated().to_vec(),
            logprobs: decoding.logprobs().to_vec(),
            finish_reason,
            error,
            prompt_tokens: self.seq.prompt.ids.len(),
            image_grid_thw: self.seq.image_grids.clone(),
            timings,
        }));
    }
}
