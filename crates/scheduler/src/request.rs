//! What goes into the engine and what comes back out of it.

use std::time::Instant;

use qwen_ocr_model::decoding::logprobs::TokenLogprob;
use qwen_ocr_model::{FinishReason, GenerateRequest, Timings};
use serde::Serialize;
use tokio::sync::mpsc;

/// A generation request and the time by which it must be done.
#[derive(Debug, Clone)]
pub struct Request {
    pub generate: GenerateRequest,
    /// When it passes, queued or running, the request ends with [`FinishReason::Timeout`].
    pub deadline: Option<Instant>,
}

impl From<GenerateRequest> for Request {
    fn from(generate: GenerateRequest) -> Self {
        Self { generate, deadline: None }
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    /// One generated token and the text it releases. The text is empty while a UTF-8
    /// character or a possible stop string is still incomplete.
    /// `logprob` is there when the request asked for log-probabilities.
    Token { id: u32, text: String, logprob: Option<TokenLogprob> },
    /// The last event of every request. Its `text` is the concatenation of all released text.
    Done(Completion),
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// Everything generated, decoded at once and cut at the first stop string.
    pub text: String,
    /// Released only now: text held back until the end (its start was already streamed).
    #[serde(skip)]
    pub tail: String,
    pub token_ids: Vec<u32>,
    /// One per generated token, when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: FinishReason,
    /// Why the request ended with `error` or `timeout`.
    pub error: Option<String>,
    pub prompt_tokens: usize,
    pub image_grid_thw: Vec<[usize; 3]>,
    pub timings: Timings,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full; try again later.
    #[error("the server is at capacity ({capacity} requests waiting); retry later")]
    QueueFull { capacity: usize },
    /// The request is invalid (prompt, sampling, limits).
    #[error(transparent)]
    Invalid(#[from] qwen_ocr_model::Error),
    /// The engine has stopped.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// Events of one request. Dropping it cancels the request within one engine step.
pub struct RequestStream {
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
    pub(crate) prompt_tokens: usize,
}

impl RequestStream {
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// The next event; `None` after `Done` (or if the engine died).
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event, blocking the thread; not for use inside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }

    /// Waits for the end and returns it, skipping the per-token events.
    pub async fn completion(mut self) -> Option<Completion> {
        while let Some(event) = self.next().await {
            if let Event::Done(c) = event {
                return Some(c);
            }
        }
        None
    }

    /// Like [`completion`](Self::completion), blocking the thread.
    pub fn blocking_completion(mut self) -> Option<Completion> {
        while let Some(event) = self.blocking_next() {
            if let Event::Done(c) = event {
                return Some(c);
            }
        }
        None
    }
}
