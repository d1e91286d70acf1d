//! The engine on the tiny checkpoint: continuous batching gives every request the tokens it
//! gets alone, and the limits (queue, KV budget, deadlines, cancellation) hold.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qwen_ocr_model::decoding::sampling::SamplingParams;
use qwen_ocr_model::preprocess::image::ImageOptions;
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::{FinishReason, GenerateRequest, LoadOptions, Pipeline};
use qwen_ocr_scheduler::{Completion, Engine, EngineConfig, Event, Request, RequestStream, SubmitError};

const PLATE_PROMPT: &str =
    "Please extract the Vehicle Sr No, Engine No, and Model from this image. Response only json format nothing else.";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn pipeline() -> Arc<Pipeline> {
    Arc::new(Pipeline::load(fixtures().join("tiny-tied").to_str().unwrap(), &LoadOptions::default()).unwrap())
}

fn request(pipeline: &Pipeline, images: &[&str], prompt: &str, max_new: usize) -> GenerateRequest {
    let images: Vec<_> =
        images.iter().map(|n| pipeline.preprocess_file(&fixtures().join("images").join(n), &ImageOptions::default()).unwrap()).collect();
    GenerateRequest {
        messages: vec![ChatMessage::user_with_images(images.len(), prompt)],
        images,
        max_new_tokens: Some(max_new),
        sampling: SamplingParams::default(),
        stop: vec![],
        adapter: None,
        ..Default::default()
    }
}

/// A text-only request the tiny model keeps generating for `max_new` tokens (no EOS).
fn long_request(pipeline: &Pipeline, max_new: usize) -> Request {
    request(pipeline, &[], "Write the registration number", max_new).into()
}

/// Reads events to the end, checking that the streamed text adds up to the final text.
fn finish(stream: RequestStream) -> Completion {
    finish_started(stream, None)
}

/// Waits for the first token, proof that the request is running.
fn first_token(stream: &mut RequestStream) -> (u32, String) {
    match stream.blocking_next() {
        Some(Event::Token { id, text, .. }) => (id, text),
        other => panic!("expected a token, got {other:?}"),
    }
}

/// [`finish`] for a stream whose first token was already read.
fn finish_started(mut stream: RequestStream, first: Option<(u32, String)>) -> Completion {
    let (mut tokens, mut streamed): (Vec<u32>, String) = first.into_iter().unzip();
    loop {
        match stream.blocking_next().expect("a Done event before the stream ends") {
            Event::Token { id, text, .. } => {
                tokens.push(id);
                streamed.push_str(&text);
            }
            Event::Done(done) => {
                streamed.push_str(&done.tail);
                assert_eq!(streamed, done.text, "streamed deltas add up to the final text");
                assert_eq!(tokens, done.token_ids, "one Token event per generated token");
                return done;
            }
        }
    }
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn concurrent_requests_with_mixed_adapters_get_their_solo_tokens() {
    let pipeline = pipeline();
    let adapter = |name: &str| Some(pipeline.model.load_adapter(name, &fixtures().join("adapters/tiny-tied").join(name)).unwrap());
    let (lm, vision, rslora) = (adapter("lm-qv-r4"), adapter("vision-merger-pattern"), adapter("lm-all-rslora-regex"));
    let cases: Vec<(&[&str], Option<_>, usize)> = vec![
        (&["plate.png"], None, 16),
        (&["plate.png"], lm.clone(), 12),
        (&["plate.png"], vision.clone(), 16),
        (&["resized.png"], rslora.clone(), 9),
        (&["gray.png"], None, 16),
        (&["plate.png", "resized.png"], lm.clone(), 16),
        (&["photo.jpg"], vision.clone(), 5),
        (&[], rslora.clone(), 16),
        (&["rgba.png"], None, 3),
        (&["palette.png"], lm.clone(), 16),
    ];
    let requests: Vec<GenerateRequest> = cases
        .iter()
        .map(|(images, adapter, max_new)| {
            let mut r = request(&pipeline, images, PLATE_PROMPT, *max_new);
            r.adapter = adapter.clone();
            r
        })
        .collect();
    let alone: Vec<_> = requests.iter().map(|r| pipeline.generate(r).unwrap()).collect();

    // A batch cap below the request count makes sequences leave and join mid-flight.
    let engine = Engine::start(pipeline.clone(), EngineConfig { max_batch_size: 4, ..EngineConfig::default() });
    let streams: Vec<_> = requests.iter().map(|r| engine.submit(r.clone().into()).unwrap()).collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = streams.into_iter().map(|stream| s.spawn(move || finish(stream))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (got, want)) in results.iter().zip(&alone).enumerate() {
        assert_eq!(got.token_ids, want.token_ids, "request {i}: tokens differ from running it alone");
        assert_eq!(got.text, want.text, "request {i}: text");
        assert_eq!(got.finish_reason, want.finish_reason, "request {i}: finish reason");
        assert_eq!(got.prompt_tokens, want.prompt_tokens, "request {i}: prompt tokens");
    }
    wait_until("everything is released", || {
        let stats = engine.stats();
        (stats.running, stats.queue_depth, stats.kv_cache_used_bytes) == (0, 0, 0)
    });
    let stats = engine.stats();
    // plate.png under no adapter and under a language-only adapter share one encoding; under
    // the vision adapter it is encoded separately. 10 images, 3 of them reusable.
    assert_eq!(stats.vision_encodes + stats.vision_cache_hits, 10);
    assert_eq!(stats.vision_encodes, 7, "{stats:?}");
}

/// The adapter registry evicts only adapters nobody holds, so a request must let go of its
/// adapter before its client can see the answer.
#[test]
fn a_request_releases_its_adapter_before_its_answer_arrives() {
    let pipeline = pipeline();
    let engine = Engine::start(pipeline.clone(), EngineConfig::default());
    let adapter = pipeline.model.load_adapter("lm", &fixtures().join("adapters/tiny-tied/lm-qv-r4")).unwrap();
    for _ in 0..5 {
        let mut r = request(&pipeline, &["plate.png"], PLATE_PROMPT, 3);
        r.adapter = Some(adapter.clone());
        let stream = engine.submit(r.into()).unwrap();
        finish(stream);
        assert_eq!(Arc::strong_count(&adapter), 1, "released when the answer is there");
    }
}

#[test]
fn a_new_request_joins_a_running_batch_without_waiting_for_it_to_drain() {
    let pipeline = pipeline();
    let engine = Engine::start(pipeline.clone(), EngineConfig { max_batch_size: 2, ..EngineConfig::default() });
    let mut long = engine.submit(long_request(&pipeline, 600)).unwrap();
    let first = first_token(&mut long);
    let short = finish(engine.submit(request(&pipeline, &["plate.png"], PLATE_PROMPT, 4).into()).unwrap());
    assert_eq!(short.token_ids.len(), 4);
    assert!(engine.stats().running >= 1, "the short request finished while the long one still ran");
    let long = finish_started(long, Some(first));
    assert_eq!((long.finish_reason, long.token_ids.len()), (FinishReason::Length, 600));
}

#[test]
fn dropping_the_stream_cancels_and_frees_the_slot() {
    let pipeline = pipeline();
    let engine = Engine::start(pipeline.clone(), EngineConfig { max_batch_size: 1, ..EngineConfig::default() });
    let mut doomed = engine.submit(long_request(&pipeline, 20_000)).unwrap();
    first_token(&mut doomed);
    wait_until("its cache is reserved", || engine.stats().kv_cache_used_bytes > 0);
    drop(doomed);
    wait_until("the cancelled sequence left", || engine.stats().running == 0);
    assert_eq!(engine.stats().kv_cache_used_bytes, 0, "its cache reservation is released");
    let next = finish(engine.submit(request(&pipeline, &["plate.png"], PLATE_PROMPT, 3).into()).unwrap());
    assert_eq!(next.finish_reason, FinishReason::Length, "the single slot is free again");
}

#[test]
fn a_full_queue_refuses_at_once_and_accepted_requests_still_finish() {
    let pipeline = pipeline();
    let engine = Engine::start(pipeline.clone(), EngineConfig { max_batch_size: 1, max_queue: 1, ..EngineConfig::default() });
    let mut running = engine.submit(long_request(&pipeline, 300)).unwrap();
    let first = first_token(&mut running);
    let queued = engine.submit(long_request(&pipeline, 5)).unwrap();
    let refused_at = Instant::now();
    let refused = engine.submit(long_request(&pipeline, 5));
    assert!(matches!(refused, Err(SubmitError::QueueFull { capacity: 1 })), "got {:?}", refused.err());
    assert!(refused_at.elapsed() < Duration::from_millis(500), "refusal does not wait for room");
    assert_eq!(finish_started(running, Some(first)).token_ids.len(), 300);
    assert_eq!(finish(queued).token_ids.len(), 5);
    assert!(engine.submit(long_request(&pipeline, 2)).is_ok(), "room again once the queue drained");
}

#[test]
fn deadlines_end_requests_with_a_timeout_queued_or_running() {
    let pipeline = pipeline();
    let engine = Engine::start(pipeline.clone(), EngineConfig::default());
    let mut running = long_request(&pipeline, 20_000);
    running.deadline = Some(Instant::now() + Duration::from_millis(300));
    let done = finish(engine.submit(running).unwrap());
    assert_eq!(done.finish_reason, FinishReason::Timeout);
    assert!(done.error.as_deref().unwrap().contains("deadline"));
    assert!(!done.token_ids.is_empty() && done.token_ids.len() < 20_000, "it ran, then stopped");

    let mut expired = long_request(&pipeline, 5);
    expired.deadline = Some(Instant::now());
    let done = finish(engine.submit(expired).unwrap());
    assert_eq!((done.finish_reason, done.token_ids.len()), (FinishReason::Timeout, 0));
    wait_until("all released", || engine.stats().kv_cache_used_bytes == 0);
}

#[test]
fn admission_waits_for_kv_room_instead_of_failing() {
    let pipeline = pipeline();
    let per_token = pipeline.model.kv_bytes_per_token();
    let long = long_request(&pipeline, 200);
    let tokens = pipeline.prepare(&long.generate).unwrap().ids.len() + 200;
    // Room for one such sequence at a time, though the batch could hold more.
    let engine = Engine::start(pipeline.clone(), EngineConfig { kv_cache_bytes: tokens * per_token, ..EngineConfig::default() });
    let first = engine.submit(long.clone()).unwrap();
    let second = engine.submit(long.clone()).unwrap();
    let (first, second) = (finish(first), finish(second));
    assert_eq!((first.token_ids.len(), second.token_ids.len()), (200, 200));
    assert_eq!(first.token_ids, second.token_ids);
    assert!(second.timings.queued_ms >= first.timings.decode_ms * 0.5, "the second waited for the first: {second:?}");

    let too_big = long_request(&pipeline, 10_000);
    let refused = engine.submit(too_big);
    assert!(matches!(&refused, Err(SubmitError::Invalid(e)) if e.to_string().contains("KV cache")), "got {:?}", refused.err());
}

#[test]
fn stop_strings_never_leak_into_the_stream() {
    let pipeline = pipeline();
    let base = request(&pipeline, &["plate.png"], PLATE_PROMPT, 16);
    let full = pipeline.generate(&base).unwrap().text;
    // Stop on a piece from the middle of what the model writes.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let mut stopped = base.clone();
    stopped.stop = vec![stop.clone()];
    let engine = Engine::start(pipeline.clone(), EngineConfig::default());
    let done = finish(engine.submit(stopped.clone().into()).unwrap());
    assert_eq!(done.finish_reason, FinishReason::Stop);
    assert_eq!(done.text, pipeline.generate(&stopped).unwrap().text);
    assert!(!done.text.contains(&stop) && full.starts_with(&done.text));
}

#[test]
fn seeded_sampling_and_greedy_requests_share_a_batch_without_changing_each_other() {
    let pipeline = pipeline();
    let requests: Vec<GenerateRequest> = (0..6)
        .map(|i| {
            let mut r = request(&pipeline, &["plate.png"], PLATE_PROMPT, 12);
            if i % 2 == 1 {
                r.sampling = SamplingParams { temperature: 0.9, top_k: 50, top_p: 0.9, repetition_penalty: 1.1, seed: Some(i) };
            }
            r
        })
        .collect();
    let alone: Vec<_> = requests.iter().map(|r| pipeline.generate(r).unwrap().token_ids).collect();
    assert_ne!(alone[1], alone[0], "sampling really samples");
    let engine = Engine::start(pipeline.clone(), EngineConfig::default());
    let streams: Vec<_> = requests.iter().map(|r| engine.submit(r.clone().into()).unwrap()).collect();
    for (i, stream) in streams.into_iter().enumerate() {
        assert_eq!(finish(stream).token_ids, alone[i], "request {i}");
    }
}

#[test]
fn forced_tokens_take_fewer_engine_steps_than_tokens_and_stream_each_token() {
    let pipeline = pipeline();
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("schemas/plate.schema.json")).unwrap()).unwrap();
    let mut constrained = request(&pipeline, &["plate.png"], PLATE_PROMPT, 64);
    constrained.grammar = Some(pipeline.vocabulary().unwrap().compile(&schema).unwrap());
    let alone = pipeline.generate(&constrained).unwrap();
    let engine = Engine::start(pipeline.clone(), EngineConfig::default());
    let done = finish(engine.submit(constrained.into()).unwrap());
    assert_eq!((&done.token_ids, &done.text), (&alone.token_ids, &alone.text));
    let steps = engine.stats().steps as usize;
    assert!(steps < done.token_ids.len(), "{steps} engine steps for {} tokens: {}", done.token_ids.len(), done.text);
    assert_eq!(engine.stats().generated_tokens as usize, done.token_ids.len());
}
