//! Continuous batching throughput: generated tokens/s with 1, 4, 8 and 16 concurrent requests
//! through the engine, against the same requests run one after another.
//!
//! Runs on the committed tiny checkpoint and on a small random one whose decoder weights
//! matter (`support/random_checkpoint.rs`, written to `target/` on first use).
//!
//!     cargo bench --bench scheduler
//!     QWEN_OCR_BENCH_MODEL=DIR QWEN_OCR_BENCH_TOKENS=64 cargo bench --bench scheduler

#[path = "support/settings.rs"]
mod settings;

#[path = "support/random_checkpoint.rs"]
mod random_checkpoint;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use qwen_ocr_model::decoding::sampling::SamplingParams;
use qwen_ocr_model::preprocess::image::ImageOptions;
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::{GenerateRequest, LoadOptions, Pipeline};
use qwen_ocr_scheduler::{Engine, EngineConfig};
use settings::env_or;

fn main() {
    qwen_ocr_model::kernels::threads::pin_cpu_thread_count();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let tokens: usize = env_or("QWEN_OCR_BENCH_TOKENS", "64").parse().unwrap();
    let image = env_or("QWEN_OCR_BENCH_IMAGE", root.join("images/plate.png").to_str().unwrap());
    match std::env::var("QWEN_OCR_BENCH_MODEL") {
        Ok(model) => bench(&model, &image, tokens),
        Err(_) => {
            bench(root.join("tiny-tied").to_str().unwrap(), &image, tokens);
            bench(random_checkpoint::small_checkpoint(512, 8).to_str().unwrap(), &image, tokens);
        }
    }
}

fn bench(model: &str, image: &str, tokens: usize) {
    let pipeline = Arc::new(Pipeline::load(model, &LoadOptions::default()).expect("load model"));
    let img = pipeline.preprocess_file(Path::new(image), &ImageOptions::default()).expect("preprocess");
    // Distinct prompts, so no two requests are the same work.
    let request = |i: usize| GenerateRequest {
        messages: vec![ChatMessage::user_with_images(1, &format!("Extract the plate number as JSON. Copy {i}."))],
        images: vec![img.clone()],
        max_new_tokens: Some(tokens),
        sampling: SamplingParams::default(),
        stop: vec![],
        adapter: None,
        ..Default::default()
    };
    // The vision cache is off so that every request pays for its image, as distinct photos would.
    let engine = Engine::start(pipeline.clone(), EngineConfig { vision_cache_entries: 0, ..EngineConfig::default() });
    pipeline.generate(&request(0)).expect("warm-up");

    println!("model {model}, {tokens} new tokens per request, {} threads", candle_core::utils::get_num_threads());
    println!("{:>11} {:>14} {:>15} {:>8}", "concurrency", "sequential t/s", "concurrent t/s", "speed-up");
    for concurrency in [1, 4, 8, 16] {
        let requests: Vec<_> = (0..concurrency).map(request).collect();
        let started = Instant::now();
        let generated: usize = requests.iter().map(|r| pipeline.generate(r).expect("generate").token_ids.len()).sum();
        let sequential = generated as f64 / started.elapsed().as_secs_f64();

        let started = Instant::now();
        let streams: Vec<_> = requests.into_iter().map(|r| engine.submit(r.into()).expect("submit")).collect();
        let generated: usize = streams.into_iter().map(|s| s.blocking_completion().expect("completion").token_ids.len()).sum();
        let concurrent = generated as f64 / started.elapsed().as_secs_f64();
        println!("{concurrency:>11} {sequential:>14.0} {concurrent:>15.0} {:>7.2}x", concurrent / sequential);
    }
}
