//! Pages per minute for a PDF through `/v1/extract`: the whole document in one request (each
//! page its own sequence, submitted together so the engine batches them) against the same pages
//! sent one request at a time (`pages=N`), on the same server. Greedy, `QWEN_OCR_BENCH_TOKENS`
//! per page; the vision cache is off, so neither run reuses the other's encoded pages. Each page
//! is rendered at `QWEN_OCR_BENCH_MAX_PIXELS` (about a 640x627 photo's worth by default, like the
//! seed task's image). Prints one JSON object.
//!
//!     QWEN_OCR_BENCH_MODEL=/path/to/checkpoint cargo bench -p qwen-ocr-server --bench documents
//!
//! `QWEN_OCR_BENCH_QUANT` (q8_0), `QWEN_OCR_BENCH_DTYPE` (f32), `QWEN_OCR_BENCH_PAGES` (10),
//! `QWEN_OCR_BENCH_TOKENS` (64), `QWEN_OCR_BENCH_MAX_PIXELS` (401408, 512 visual tokens),
//! `QWEN_OCR_BENCH_BINARY` (another build of `qwen-ocr`). Without a model it runs on the committed
//! tiny checkpoint, which measures overhead only.

#[path = "support/settings.rs"]
mod settings;

#[path = "../crates/server/tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{fixtures, Server};
use qwen_ocr_server::api::extract::DocumentExtraction;
use serde_json::json;
use settings::{env_or, SEED_PROMPT};

fn main() {
    let model = env_or("QWEN_OCR_BENCH_MODEL", fixtures().join("tiny-tied").to_str().unwrap());
    let quant = env_or("QWEN_OCR_BENCH_QUANT", "q8_0");
    let dtype = env_or("QWEN_OCR_BENCH_DTYPE", "f32");
    let pages: u32 = env_or("QWEN_OCR_BENCH_PAGES", "10").parse().expect("QWEN_OCR_BENCH_PAGES");
    let tokens = env_or("QWEN_OCR_BENCH_TOKENS", "64");
    let max_pixels = env_or("QWEN_OCR_BENCH_MAX_PIXELS", "401408");

    // The whole document is one request: on a slow CPU it outlasts the default 300 s limit.
    let config = format!("max_pdf_pages = {pages}\nrequest_timeout_secs = 3600\n[engine]\nvision_cache_entries = 0\n");
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("qwen-ocr.toml");
    std::fs::write(&config_file, config).unwrap();
    let config_file = config_file.display().to_string();
    let mut args = vec!["--dtype", dtype.as_str(), "--config", config_file.as_str()];
    if !quant.is_empty() {
        args.extend(["--quant", quant.as_str()]);
    }
    let started = Instant::now();
    let server = Server::start_model_within(&model, &args, &[], Duration::from_secs(1800));
    let load_s = started.elapsed().as_secs_f64();

    // Every page differs ("Invoice 3 of 10", its number and total), so no two share pixels.
    let document = common::pdf::document(pages);
    let read = |pdf: &[u8], selection: &str| -> (f64, DocumentExtraction) {
        let fields = [
            ("prompt", SEED_PROMPT),
            ("max_tokens", tokens.as_str()),
            ("temperature", "0"),
            ("max_pixels", max_pixels.as_str()),
            ("pages", selection),
        ];
        let started = Instant::now();
        let (status, body) = server.extract_multipart(&[("file", "document.pdf", pdf)], &fields, &[]);
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(status, 200, "{body}");
        let document: DocumentExtraction = common::parse(&body);
        assert!(document.pages.iter().all(|p| p.error.is_none() || p.finish_reason.is_some()), "{body}");
        (seconds, document)
    };
    // Warm-up on another document's page (other pixels).
    read(&common::pdf::document(1), "1");

    let mut one_at_a_time = Vec::new();
    for page in 1..=pages {
        one_at_a_time.push(read(&document, &page.to_string()));
    }
    let (batched_s, batched) = read(&document, &format!("1-{pages}"));
    let single_s: f64 = one_at_a_time.iter().map(|(s, _)| s).sum();
    let generated = |d: &DocumentExtraction| d.pages.iter().map(|p| p.usage.completion_tokens).sum::<usize>();
    let per_minute = |seconds: f64| pages as f64 / seconds * 60.0;
    println!(
        "{}",
        json!({
            "model": model,
            "quant": quant,
            "pages": pages,
            "max_tokens": tokens,
            "max_pixels": max_pixels,
            "load_s": load_s,
            "prompt_tokens_per_page": batched.pages.iter().map(|p| p.usage.prompt_tokens).collect::<Vec<_>>(),
            "batched": {
                "seconds": batched_s,
                "pages_per_min": per_minute(batched_s),
                "completion_tokens": generated(&batched),
            },
            "one_at_a_time": {
                "seconds": single_s,
                "pages_per_min": per_minute(single_s),
                "completion_tokens": one_at_a_time.iter().map(|(_, d)| generated(d)).sum::<usize>(),
                "per_page_s": one_at_a_time.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            },
            "speedup": single_s / batched_s,
        })
    );
}
