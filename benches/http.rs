//! End to end through `qwen-ocr serve`: 8 extraction requests sent at once against the same 8
//! sent one after another (release build of the server). Runs on the committed tiny
//! checkpoint and on a small random one whose decoder weights matter (see
//! `support/random_checkpoint.rs`; written to `target/` on first use).
//!
//!     cargo bench --bench http
//!     QWEN_OCR_BENCH_TOKENS=64 QWEN_OCR_BENCH_REQUESTS=16 cargo bench --bench http

#[path = "../crates/server/tests/common/mod.rs"]
mod common;
#[path = "support/random_checkpoint.rs"]
mod random_checkpoint;

use std::time::Instant;

use common::{image_bytes, tiny_model, Server};

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let tokens = env_or("QWEN_OCR_BENCH_TOKENS", 64);
    let requests = env_or("QWEN_OCR_BENCH_REQUESTS", 8);
    println!("{requests} /v1/extract requests x {tokens} tokens");
    bench("tiny (16-wide decoder)", &tiny_model(), requests, tokens);
    let small = random_checkpoint::small_checkpoint(512, 8);
    bench("small (512-wide, 8 layers)", small.to_str().unwrap(), requests, tokens);
}

fn bench(label: &str, model: &str, requests: usize, tokens: usize) {
    let server = Server::start_model(model, &[], &[]);
    let plate = image_bytes("plate.png");
    let tokens = tokens.to_string();
    let extract = |i: usize| {
        let prompt = format!("Extract the plate number as JSON. Copy {i}.");
        let (status, body) =
            server.extract_multipart(&[("image", "plate.png", &plate)], &[("prompt", &prompt), ("max_tokens", &tokens)], &[]);
        assert_eq!(status, 200, "{body}");
        body["usage"]["completion_tokens"].as_u64().unwrap()
    };
    extract(usize::MAX);

    let started = Instant::now();
    let generated: u64 = (0..requests).map(extract).sum();
    let sequential = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let concurrent_generated: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..requests).map(|i| s.spawn(move || extract(i))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let concurrent = started.elapsed().as_secs_f64();
    assert_eq!(generated, concurrent_generated, "the same requests generate the same tokens");

    println!(
        "{label}: one after another {sequential:.3} s ({:.0} tok/s), all at once {concurrent:.3} s ({:.0} tok/s), speed-up {:.2}x",
        generated as f64 / sequential,
        generated as f64 / concurrent,
        sequential / concurrent
    );
}
