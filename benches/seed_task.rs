//! The seed task through the real serving path: `qwen-ocr serve` on a checkpoint, then
//! `/v1/extract` with one plate photo and the seed prompt, 64 greedy tokens, a new image per
//! request (so the vision cache never hits). Prints one JSON object with the same fields as
//! `benches/seed_task/reference.py`, which times transformers on the same task.
//!
//!     QWEN_OCR_BENCH_MODEL=/path/to/checkpoint QWEN_OCR_BENCH_IMAGES=/path/to/images \
//!         cargo bench --bench seed_task
//!
//! `QWEN_OCR_BENCH_QUANT` (q8_0; empty passes no `--quant`, for builds from before it existed),
//! `QWEN_OCR_BENCH_DTYPE` (f32), `QWEN_OCR_BENCH_REQUESTS` (3), `QWEN_OCR_BENCH_TOKENS` (64),
//! `QWEN_OCR_BENCH_BINARY` (another build of `qwen-ocr` to time, e.g. an older commit's),
//! `QWEN_OCR_AMX=0` (the same build without the AMX tile kernels), `QWEN_OCR_MAX_ISA=avx2` or
//! `baseline` (without AVX-512, or AVX2 too: what an older CPU runs), `QWEN_OCR_STAGE_PROFILE=1`
//! (adds `stages`: seconds per request by phase and operation, from the server's `/metrics`),
//! `QWEN_OCR_BENCH_AT_ONCE=N` (then N further images sent at once, against N times the median
//! request one after another: `at_once`).
//! Without a model it runs on the committed tiny checkpoint and image, which measures overhead
//! only.

#[path = "support/settings.rs"]
mod settings;

#[path = "../crates/server/tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{fixtures, stage_profile, Server};
use serde_json::{json, Value};
use settings::{env_or, median, SEED_PROMPT};

/// Peak resident memory of a process, from `/proc` (Linux).
fn peak_rss_gib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

fn main() {
    let model = env_or("QWEN_OCR_BENCH_MODEL", fixtures().join("tiny-tied").to_str().unwrap());
    let quant = env_or("QWEN_OCR_BENCH_QUANT", "q8_0");
    let dtype = env_or("QWEN_OCR_BENCH_DTYPE", "f32");
    let requests: usize = env_or("QWEN_OCR_BENCH_REQUESTS", "3").parse().expect("QWEN_OCR_BENCH_REQUESTS");
    let at_once: usize = env_or("QWEN_OCR_BENCH_AT_ONCE", "0").parse().expect("QWEN_OCR_BENCH_AT_ONCE");
    let tokens = env_or("QWEN_OCR_BENCH_TOKENS", "64");
    let images: Vec<PathBuf> = match std::env::var("QWEN_OCR_BENCH_IMAGES") {
        Ok(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir).expect("QWEN_OCR_BENCH_IMAGES").map(|e| e.unwrap().path()).collect();
            files.sort();
            files
        }
        Err(_) => vec![fixtures().join("images/photo.jpg"); requests + 1 + at_once],
    };
    let needed = requests + 1 + at_once;
    assert!(images.len() >= needed, "need {needed} different images (a warm-up, one per request, one per request at once)");

    let started = Instant::now();
    let mut args = vec!["--dtype", dtype.as_str()];
    if !quant.is_empty() {
        args.extend(["--quant", quant.as_str()]);
    }
    // The harness keeps QWEN_OCR_* out of the server; QWEN_OCR_AMX and QWEN_OCR_MAX_ISA are
    // passed on on purpose, to time the same build without the tile (or AVX-512, AVX2) kernels,
    // and QWEN_OCR_STAGE_PROFILE to see where its time goes.
    let passed: Vec<(&str, String)> = ["QWEN_OCR_AMX", "QWEN_OCR_MAX_ISA", "QWEN_OCR_STAGE_PROFILE"]
        .into_iter()
        .filter_map(|name| Some((name, std::env::var(name).ok()?)))
        .collect();
    let env: Vec<(&str, &str)> = passed.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let server = Server::start_model_within(&model, &args, &env, Duration::from_secs(1800));
    let load_s = started.elapsed().as_secs_f64();

    let extract = |image: &PathBuf| -> (f64, Value) {
        let bytes = std::fs::read(image).unwrap();
        let started = Instant::now();
        let (status, body) = server.extract_multipart(
            &[("image", "plate.jpg", &bytes)],
            &[("prompt", SEED_PROMPT), ("max_tokens", &tokens), ("temperature", "0")],
            &[],
        );
        let e2e = started.elapsed().as_secs_f64();
        assert_eq!(status, 200, "{body}");
        (e2e, body)
    };
    extract(&images[0]);
    let profile_after_warm_up = stage_profile(&server.get("/metrics").1);

    let mut runs = Vec::new();
    for image in &images[1..=requests] {
        let (e2e, body) = extract(image);
        let t = &body["timings"];
        let generated = body["usage"]["completion_tokens"].as_u64().unwrap();
        let decode_s = t["decode_ms"].as_f64().unwrap() / 1e3;
        runs.push(json!({
            "e2e_s": e2e,
            // Everything before the first token, as the client sees it: upload, preprocessing,
            // queueing, vision tower and prompt.
            "ttft_s": e2e - decode_s,
            // Builds from before the vision timer report none.
            "vision_s": t["vision_ms"].as_f64().map(|ms| ms / 1e3),
            "decode_tok_s": (generated.saturating_sub(1)) as f64 / decode_s,
            "prompt_tokens": body["usage"]["prompt_tokens"],
            "generated_tokens": generated,
        }));
    }
    // Seconds per request, measured requests only.
    let stages: serde_json::Map<String, Value> = stage_profile(&server.get("/metrics").1)
        .into_iter()
        .map(|(stage, total)| {
            let before = profile_after_warm_up.get(&stage).map_or(0, |t| t.micros);
            (stage, json!((total.micros - before) as f64 / 1e6 / requests as f64))
        })
        .collect();
    // New images, so that neither the vision cache nor a shared prefix makes it cheaper.
    let at_once = (at_once > 0).then(|| {
        let started = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = images[requests + 1..needed].iter().map(|image| s.spawn(|| extract(image))).collect();
            handles.into_iter().for_each(|h| drop(h.join().unwrap()));
        });
        let seconds = started.elapsed().as_secs_f64();
        let one_after_another = at_once as f64 * median(runs.iter().map(|r| r["e2e_s"].as_f64().unwrap()).collect());
        json!({"requests": at_once, "seconds": seconds, "one_after_another_s": one_after_another, "speedup": one_after_another / seconds})
    });
    let med = |key: &str| median(runs.iter().map(|r| r[key].as_f64().unwrap()).collect());
    let report = json!({
        "system": "qwen-ocr",
        "quant": quant,
        "dtype": dtype,
        "env": passed.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>(),
        "model": model,
        "load_s": load_s,
        "vision_s": runs[0]["vision_s"].is_number().then(|| med("vision_s")),
        "ttft_s": med("ttft_s"),
        "decode_tok_s": med("decode_tok_s"),
        "e2e_s": med("e2e_s"),
        "peak_rss_gib": peak_rss_gib(server.pid()),
        "prompt_tokens": runs[0]["prompt_tokens"],
        "generated_tokens": runs[0]["generated_tokens"],
        "stages": (!stages.is_empty()).then_some(stages),
        "at_once": at_once,
        "runs": runs,
    });
    println!("{report}");
}
