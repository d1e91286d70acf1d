//! End-to-end generation speed: time to first token (vision tower + prompt) and decode
//! tokens/s for one request, median over several runs.
//!
//!     cargo bench --bench generate
//!     QWEN_OCR_BENCH_MODEL=Qwen/Qwen2-VL-2B-Instruct QWEN_OCR_BENCH_IMAGE=photo.jpg cargo bench --bench generate
//!
//! Defaults to the tiny committed checkpoint, which measures overheads rather than arithmetic.
//! `QWEN_OCR_STAGE_PROFILE=1` adds where a run's time goes, by phase and operation.

#[path = "support/settings.rs"]
mod settings;

use std::path::{Path, PathBuf};

use qwen_ocr_model::decoding::sampling::SamplingParams;
use qwen_ocr_model::model::{parse_device, parse_dtype};
use qwen_ocr_model::preprocess::image::ImageOptions;
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::stage_profile;
use qwen_ocr_model::{GenerateRequest, LoadOptions, Pipeline, Quant};
use settings::{env_or, median, SEED_PROMPT};

fn main() {
    qwen_ocr_model::kernels::threads::pin_cpu_thread_count();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = env_or("QWEN_OCR_BENCH_MODEL", root.join("tests/fixtures/tiny-tied").to_str().unwrap());
    let image = PathBuf::from(env_or("QWEN_OCR_BENCH_IMAGE", root.join("tests/fixtures/images/large.png").to_str().unwrap()));
    let tokens: usize = env_or("QWEN_OCR_BENCH_TOKENS", "64").parse().expect("QWEN_OCR_BENCH_TOKENS");
    let runs: usize = env_or("QWEN_OCR_BENCH_RUNS", "5").parse().expect("QWEN_OCR_BENCH_RUNS");
    let dtype = parse_dtype(&env_or("QWEN_OCR_BENCH_DTYPE", "f32")).unwrap();
    let device = parse_device(&env_or("QWEN_OCR_BENCH_DEVICE", "cpu")).unwrap();
    let quant = Quant::parse(&env_or("QWEN_OCR_BENCH_QUANT", "none"), &device).unwrap();
    let options = LoadOptions { dtype, device, quant, quant_cache: None };

    let pipeline = Pipeline::load(&model, &options).expect("load model");
    let img = pipeline.preprocess_file(&image, &ImageOptions::default()).expect("preprocess");
    let request = GenerateRequest {
        messages: vec![ChatMessage::user_with_images(1, SEED_PROMPT)],
        images: vec![img],
        max_new_tokens: Some(tokens),
        sampling: SamplingParams::default(),
        stop: vec![],
        adapter: None,
        ..Default::default()
    };
    pipeline.generate(&request).expect("warm-up");
    let after_warm_up = stage_profile::totals();
    let (mut ttft, mut decode) = (Vec::new(), Vec::new());
    let mut out = None;
    for _ in 0..runs {
        let o = pipeline.generate(&request).expect("generate");
        ttft.push(o.timings.prefill_ms);
        decode.push((o.token_ids.len().saturating_sub(1)) as f64 / (o.timings.decode_ms / 1e3));
        out = Some(o);
    }
    let out = out.unwrap();
    println!(
        "model={model} dtype={:?} quant={} image={} prompt_tokens={} generated={} runs={runs}\n  time to first token {:.1} ms (median)\n  decode {:.1} tokens/s (median)",
        options.dtype,
        options.quant.as_str(),
        image.display(),
        out.prompt_tokens,
        out.token_ids.len(),
        median(ttft),
        median(decode),
    );
    for total in stage_profile::totals() {
        let before = after_warm_up.iter().find(|b| (b.phase, b.op) == (total.phase, total.op)).map_or(0, |b| b.nanos);
        println!("  {}.{}: {:.1} ms per run", total.phase, total.op, (total.nanos - before) as f64 / 1e6 / runs as f64);
    }
}
