//! The engine: a handle that queues requests, and the worker thread that owns the batch.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use std::path::Path;

use qwen_ocr_model::adapters::lora::LoraAdapter;
use qwen_ocr_model::config::PreprocessorConfig;
use qwen_ocr_model::decoding::grammar::Vocabulary;
use qwen_ocr_model::decoding::sampling::SamplingParams;
use qwen_ocr_model::preprocess::image::{ImageOptions, PreprocessedImage};
use qwen_ocr_model::schema::Constraint;
use qwen_ocr_model::{Error, Family, FinishReason, Pipeline, Sequence, VisualEmbeds};
use tokio::sync::mpsc;

use crate::config::EngineConfig;
use crate::kv_budget::KvBudget;
use crate::metrics::{self as m, SharedStats, Stats};
use crate::request::{Event, Request, RequestStream, SubmitError};
use crate::sequence::EngineSequence;
use crate::vision_cache::{ImageKey, VisionCache};

/// Owns the model's worker thread, and is the one way in to the model for everything else:
/// preprocessing, sampling defaults, schemas, adapters. Dropping it lets the worker finish
/// every accepted request and then stop; [`shutdown`](Engine::shutdown) also waits for that.
pub struct Engine {
    inbox: Option<std_mpsc::Sender<EngineSequence>>,
    pipeline: Arc<Pipeline>,
    config: EngineConfig,
    stats: Arc<SharedStats>,
    kv_bytes_per_token: usize,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    pub fn start(pipeline: Arc<Pipeline>, config: EngineConfig) -> Self {
        let (inbox, receiver) = std_mpsc::channel();
        let stats = Arc::new(SharedStats::default());
        let kv_bytes_per_token = pipeline.model.kv_bytes_per_token();
        stats.kv_cache_capacity_bytes.store(config.kv_cache_bytes, Ordering::Relaxed);
        metrics::gauge!(m::KV_CACHE_CAPACITY_BYTES).set(config.kv_cache_bytes as f64);
        let worker = Worker {
            pipeline: pipeline.clone(),
            max_batch_size: config.max_batch_size.max(1),
            max_prefill_tokens: config.max_prefill_tokens,
            inbox: receiver,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv: KvBudget::new(config.kv_cache_bytes, kv_bytes_per_token),
            vision: VisionCache::new(config.vision_cache_entries),
            stats: stats.clone(),
        };
        let worker = std::thread::Builder::new().name("qwen-ocr-engine".into()).spawn(move || worker.run()).expect("spawn engine thread");
        Self { inbox: Some(inbox), pipeline, config, stats, kv_bytes_per_token, worker: Some(worker) }
    }

    /// The loaded model's family.
    pub fn family(&self) -> Family {
        self.pipeline.family()
    }

    /// Decodes and preprocesses an image as the loaded checkpoint's processor does.
    pub fn preprocess(&self, bytes: &[u8], options: &ImageOptions) -> Result<PreprocessedImage, Error> {
        self.pipeline.preprocess(bytes, options)
    }

    /// The checkpoint's image processor settings.
    pub fn preprocessor(&self) -> &PreprocessorConfig {
        &self.pipeline.preprocessor
    }

    /// Sampling defaults from the checkpoint's `generation_config.json`.
    pub fn default_sampling(&self) -> SamplingParams {
        self.pipeline.default_sampling()
    }

    /// Every token's bytes (log-probabilities, confidences).
    pub fn vocabulary(&self) -> Result<&Vocabulary, Error> {
        self.pipeline.vocabulary()
    }

    /// Generated ids as text with the special tokens kept (`Completion::text` drops them).
    pub fn text_with_special_tokens(&self, ids: &[u32]) -> Result<String, Error> {
        self.pipeline.prompt.decode_with_special_tokens(ids)
    }

    /// A JSON schema made into a decoding constraint over this checkpoint's vocabulary
    /// (grammars cached), strictly or relaxed (see [`qwen_ocr_model::schema`]).
    pub fn compile_schema(&self, schema: &serde_json::Value, strict: bool) -> Result<Constraint, Error> {
        self.pipeline.vocabulary()?.constrain(schema, strict)
    }

    /// Loads and validates a PEFT LoRA adapter against the loaded model.
    pub fn load_adapter(&self, name: &str, dir: &Path) -> Result<Arc<LoraAdapter>, Error> {
        self.pipeline.load_adapter(name, dir)
    }

    /// Bytes the weights of every projection take.
    pub fn projection_bytes(&self) -> usize {
        self.pipeline.model.projection_bytes()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> Stats {
        self.stats.snapshot()
    }

    /// Validates and queues a request. Never waits: a full queue is refused at once.
    pub fn submit(&self, request: Request) -> Result<RequestStream, SubmitError> {
        let Request { generate, deadline } = request;
        let seq = self.pipeline.start(generate, true)?;
        let needed = seq.max_tokens().saturating_mul(self.kv_bytes_per_token);
        if needed > self.config.kv_cache_bytes {
            return Err(SubmitError::Invalid(Error::InvalidRequest(format!(
                "the prompt ({} tokens) plus max_tokens ({}) needs {needed} bytes of KV cache, over the server's {} bytes: \
                 lower max_tokens or send a smaller image",
                seq.prompt.ids.len(),
                seq.prompt.max_new,
                self.config.kv_cache_bytes
            ))));
        }
        let inbox = self.inbox.as_ref().ok_or(SubmitError::ShuttingDown)?;
        let capacity = self.config.max_queue;
        self.stats
            .queue_depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| (d < capacity).then_some(d + 1))
            .map_err(|_| SubmitError::QueueFull { capacity })?;
        let (events, receiver) = mpsc::unbounded_channel();
        let prompt_tokens = seq.prompt.ids.len();
        let seq = EngineSequence {
            seq,
            deadline,
            events,
            submitted: Instant::now(),
            admitted: None,
            first_token: None,
            vision: Default::default(),
            error: None,
        };
        if inbox.send(seq).is_err() {
            self.stats.queue_depth.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::ShuttingDown);
        }
        metrics::gauge!(m::QUEUE_DEPTH).set(self.stats.queue_depth.load(Ordering::Relaxed) as f64);
        Ok(RequestStream { events: receiver, prompt_tokens })
    }

    /// Stops accepting requests, lets the worker finish every accepted one, and waits for it.
    pub fn shutdown(mut self) {
        self.inbox = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the inbox is the stop signal; the worker drains what it accepted.
        self.inbox = None;
    }
}

struct Worker {
    pipeline: Arc<Pipeline>,
    max_batch_size: usize,
    max_prefill_tokens: usize,
    inbox: std_mpsc::Receiver<EngineSequence>,
    /// Accepted, not yet admitted, in arrival order.
    waiting: VecDeque<EngineSequence>,
    /// Admitted; those not yet prefilled are, at the next step.
    running: Vec<EngineSequence>,
    kv: KvBudget,
    vision: VisionCache,
    stats: Arc<SharedStats>,
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.inbox.recv() {
                    Ok(seq) => self.waiting.push_back(seq),
                    Err(_) => return,
                }
            }
            while let Ok(seq) = self.inbox.try_recv() {
                self.waiting.push_back(seq);
            }
            self.drop_abandoned_waiting();
            self.admit();
            if !self.running.is_empty() {
                let started = Instant::now();
                let outcome = catch_unwind(AssertUnwindSafe(|| self.step()));
                let failure = match outcome {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(panic) => Some(panic_message(panic.as_ref())),
                };
                if let Some(reason) = failure {
                    tracing::error!(%reason, sequences = self.running.len(), "engine step failed; ending its sequences");
                    for seq in &mut self.running {
                        seq.end(FinishReason::Error, Some(format!("generation failed: {reason}")));
                    }
                }
                metrics::histogram!(m::STEP_SECONDS).record(started.elapsed().as_secs_f64());
            }
            self.end_abandoned_running();
            self.retire_finished();
            self.publish_stats();
        }
    }

    /// Waiting requests whose client left or whose deadline passed never reach the model.
    fn drop_abandoned_waiting(&mut self) {
        let now = Instant::now();
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for mut seq in self.waiting.drain(..) {
            if seq.is_cancelled() {
                seq.end(FinishReason::Cancelled, None);
            } else if seq.deadline.is_some_and(|d| now >= d) {
                seq.end(FinishReason::Timeout, Some("the request's deadline passed while it was queued".into()));
            } else {
                kept.push_back(seq);
                continue;
            }
            self.stats.queue_depth.fetch_sub(1, Ordering::AcqRel);
            seq.complete(&self.pipeline);
        }
        self.waiting = kept;
    }

    /// Admits from the front of the queue while batch slots, the prefill token budget and KV
    /// cache room allow. Strict FIFO: a long prompt at the front is never overtaken, and one
    /// over the prefill budget is admitted alone.
    fn admit(&mut self) {
        let mut prefill_tokens = 0;
        while let Some(front) = self.waiting.front() {
            let n = front.seq.prompt.ids.len();
            if self.running.len() >= self.max_batch_size
                || (prefill_tokens > 0 && prefill_tokens + n > self.max_prefill_tokens)
                || !self.kv.try_reserve(front.seq.max_tokens())
            {
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            self.stats.queue_depth.fetch_sub(1, Ordering::AcqRel);
            seq.admitted = Some(Instant::now());
            prefill_tokens += n;
            self.running.push(seq);
        }
    }

    /// One forward pass: prefill for newly admitted sequences, one decode token for the rest.
    fn step(&mut self) -> Result<(), Error> {
        self.encode_new_images()?;
        let prefill_tokens: usize = self.running.iter().filter(|s| s.seq.is_prefilling()).map(|s| s.seq.prompt.ids.len()).sum();
        let mut active: Vec<&mut Sequence> = self.running.iter_mut().map(|s| &mut s.seq).collect();
        let steps = self.pipeline.step(&mut active)?;

        let now = Instant::now();
        let mut generated = 0;
        for (seq, steps) in self.running.iter_mut().zip(steps) {
            seq.first_token.get_or_insert(now);
            generated += steps.len();
            for step in steps {
                let _ = seq.events.send(Event::Token { id: step.token, text: step.delta, logprob: step.logprob });
            }
        }
        let batch = self.running.len();
        self.stats.last_batch_size.store(batch, Ordering::Relaxed);
        self.stats.generated_tokens.fetch_add(generated as u64, Ordering::Relaxed);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!(m::BATCH_SIZE).record(batch as f64);
        metrics::counter!(m::GENERATED_TOKENS).increment(generated as u64);
        metrics::counter!(m::PROMPT_TOKENS).increment(prefill_tokens as u64);
        m::publish_stage_profile();
        Ok(())
    }

    /// Visual embeddings for every newly admitted sequence, from the cache where possible; the
    /// misses, each distinct image once, go through the vision tower in one pass.
    fn encode_new_images(&mut self) -> Result<(), Error> {
        let mut keys: Vec<Vec<ImageKey>> = Vec::new();
        let mut found: HashMap<ImageKey, VisualEmbeds> = HashMap::new();
        let mut misses: Vec<(ImageKey, &PreprocessedImage, Option<&LoraAdapter>)> = Vec::new();
        let mut hits = 0;
        let mut vision_time = std::time::Duration::ZERO;
        let encoding = |s: &&EngineSequence| !s.seq.images_to_encode().is_empty();
        for seq in self.running.iter().filter(encoding) {
            let adapter = seq.seq.adapter.as_deref();
            let mut seq_keys = Vec::with_capacity(seq.seq.images_to_encode().len());
            for image in seq.seq.images_to_encode() {
                let key = ImageKey::new(image, adapter);
                if found.contains_key(&key) || misses.iter().any(|m| m.0 == key) {
                    hits += 1;
                } else if let Some(embeds) = self.vision.get(&key) {
                    hits += 1;
                    found.insert(key, embeds);
                } else {
                    misses.push((key, image, key.vision_adapter(adapter)));
                }
                seq_keys.push(key);
            }
            keys.push(seq_keys);
        }
        if !misses.is_empty() {
            let images: Vec<_> = misses.iter().map(|m| m.1).collect();
            let adapters: Vec<_> = misses.iter().map(|m| m.2).collect();
            let started = Instant::now();
            let encoded = self.pipeline.encode_images(&images, &adapters)?;
            vision_time = started.elapsed();
            for (miss, embeds) in misses.iter().zip(encoded) {
                self.vision.put(miss.0, embeds.clone());
                found.insert(miss.0, embeds);
            }
        }
        self.stats.vision_encodes.fetch_add(misses.len() as u64, Ordering::Relaxed);
        self.stats.vision_cache_hits.fetch_add(hits, Ordering::Relaxed);
        metrics::counter!(m::VISION_CACHE_MISSES).increment(misses.len() as u64);
        metrics::counter!(m::VISION_CACHE_HITS).increment(hits);
        // One pass serves every sequence admitted in this step: each waited for all of it.
        for (seq, seq_keys) in self.running.iter_mut().filter(|s| !s.seq.images_to_encode().is_empty()).zip(keys) {
            seq.vision = vision_time;
            seq.seq.set_visual_embeds(seq_keys.iter().map(|k| found[k].clone()).collect())?;
        }
        Ok(())
    }

    /// Running sequences whose client left or whose deadline passed stop here, within one step.
    fn end_abandoned_running(&mut self) {
        let now = Instant::now();
        for seq in &mut self.running {
            if seq.is_cancelled() {
                seq.end(FinishReason::Cancelled, None);
            } else if seq.deadline.is_some_and(|d| now >= d) {
                seq.end(FinishReason::Timeout, Some("the request's deadline passed during generation".into()));
            }
        }
    }

    /// Finished sequences leave the batch, free their cache and get their final event.
    fn retire_finished(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running).into_iter().partition(EngineSequence::is_finished);
        self.running = running;
        for seq in done {
            self.kv.release(seq.seq.max_tokens());
            let reason = seq.seq.decoding.finish_reason().expect("finished");
            metrics::counter!(m::FINISHED, "reason" => reason.as_str()).increment(1);
            seq.complete(&self.pipeline);
        }
    }

    fn publish_stats(&self) {
        let r = Ordering::Relaxed;
        self.stats.running.store(self.running.len(), r);
        self.stats.kv_cache_used_bytes.store(self.kv.used(), r);
        metrics::gauge!(m::RUNNING_SEQUENCES).set(self.running.len() as f64);
        metrics::gauge!(m::KV_CACHE_USED_BYTES).set(self.kv.used() as f64);
        metrics::gauge!(m::QUEUE_DEPTH).set(self.stats.queue_depth.load(r) as f64);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let detail = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
    format!("internal error: {}", detail.unwrap_or_else(|| "panic".into()))
}
