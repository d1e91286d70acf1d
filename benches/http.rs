//! End to end through `qwen-ocr serve`: 8 requests sent at once against the same 8 sent one
//! after another (release build of the server). Extraction requests on the committed tiny
//! checkpoint and on a small random one whose decoder weights matter; text-only chat requests
//! on a random decoder of Qwen2-0.5B's shape, with exact f32 weights and with Q8_0 (see
//! `support/random_checkpoint.rs`; checkpoints are written to `target/` on first use).
//!
//!     cargo bench --bench http
//!     QWEN_OCR_BENCH_TOKENS=64 QWEN_OCR_BENCH_REQUESTS=16 QWEN_OCR_BENCH_RUNS=0.5b cargo bench --bench http

#[path = "../crates/server/tests/common/mod.rs"]
mod common;
#[path = "support/random_checkpoint.rs"]
mod random_checkpoint;

use std::time::Instant;

use common::{image_bytes, tiny_model, Server};
use serde_json::json;

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let tokens = env_or("QWEN_OCR_BENCH_TOKENS", 64);
    let requests = env_or("QWEN_OCR_BENCH_REQUESTS", 8);
    let runs = std::env::var("QWEN_OCR_BENCH_RUNS").unwrap_or_else(|_| "tiny,small,0.5b".into());
    let runs: Vec<&str> = runs.split(',').collect();
    println!("{requests} requests x {tokens} tokens");
    if runs.contains(&"tiny") {
        bench("tiny (16-wide decoder), /v1/extract", &tiny_model(), &[], Kind::Extract, requests, tokens);
    }
    if runs.contains(&"small") {
        let small = random_checkpoint::small_checkpoint(512, 8);
        bench("small (512-wide, 8 layers), /v1/extract", small.to_str().unwrap(), &[], Kind::Extract, requests, tokens);
    }
    if runs.contains(&"0.5b") {
        let model = random_checkpoint::qwen2_0_5b_shaped_checkpoint();
        for quant in ["none", "q8_0"] {
            let label = format!("0.5B-shaped decoder, text-only chat, --quant {quant}");
            bench(&label, model.to_str().unwrap(), &["--quant", quant], Kind::TextChat, requests, tokens);
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Extract,
    TextChat,
}

fn bench(label: &str, model: &str, args: &[&str], kind: Kind, requests: usize, tokens: usize) {
    let server = Server::start_model(model, args, &[]);
    let plate = image_bytes("plate.png");
    let extract = |i: usize| {
        let body = match kind {
            Kind::Extract => {
                let prompt = format!("Extract the plate number as JSON. Copy {i}.");
                let fields = [("prompt", prompt.as_str()), ("max_tokens", &tokens.to_string())];
                let (status, body) = server.extract_multipart(&[("image", "plate.png", &plate)], &fields, &[]);
                assert_eq!(status, 200, "{body}");
                body
            }
            Kind::TextChat => {
                let request = json!({
                    "messages": [{"role": "user", "content": format!("Write the plate number of car {i} as JSON.")}],
                    "max_tokens": tokens,
                    "temperature": 0,
                });
                let (status, body) = server.post_json("/v1/chat/completions", &request, &[]);
                assert_eq!(status, 200, "{body}");
                body
            }
        };
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
