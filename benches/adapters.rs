//! Cost of unmerged LoRA: one batch of requests with a mix of adapters (and some without)
//! against the same batch with no adapters, median wall time over several runs.
//!
//!     cargo bench --bench adapters
//!     QWEN_OCR_BENCH_MODEL=DIR QWEN_OCR_BENCH_ADAPTERS=a,b,c cargo bench --bench adapters

use std::path::Path;
use std::time::Instant;

use qwen_ocr_model::image::ImageOptions;
use qwen_ocr_model::prompt::ChatMessage;
use qwen_ocr_model::sampling::SamplingParams;
use qwen_ocr_model::{GenerateRequest, LoadOptions, Pipeline};

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn main() {
    qwen_ocr_model::threads::pin_cpu_thread_count();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let model = env_or("QWEN_OCR_BENCH_MODEL", root.join("tiny-tied").to_str().unwrap());
    let default_adapters = ["lm-qv-r4", "lm-all-rslora-regex", "vision-merger-pattern"]
        .map(|a| root.join("adapters/tiny-tied").join(a).display().to_string())
        .join(",");
    let adapter_dirs = env_or("QWEN_OCR_BENCH_ADAPTERS", &default_adapters);
    let batch: usize = env_or("QWEN_OCR_BENCH_BATCH", "8").parse().unwrap();
    let tokens: usize = env_or("QWEN_OCR_BENCH_TOKENS", "32").parse().unwrap();
    let runs: usize = env_or("QWEN_OCR_BENCH_RUNS", "5").parse().unwrap();
    let image = env_or("QWEN_OCR_BENCH_IMAGE", root.join("images/large.png").to_str().unwrap());

    let pipeline = Pipeline::load(&model, &LoadOptions::default()).expect("load model");
    let adapters: Vec<_> = adapter_dirs.split(',').map(|d| pipeline.model.load_adapter(d, Path::new(d)).expect("load adapter")).collect();
    let img = pipeline.preprocess_file(Path::new(&image), &ImageOptions::default()).expect("preprocess");
    let requests = |mixed: bool| -> Vec<GenerateRequest> {
        (0..batch)
            .map(|i| GenerateRequest {
                messages: vec![ChatMessage::user_with_images(1, "Extract the plate number as JSON.")],
                images: vec![img.clone()],
                max_new_tokens: Some(tokens),
                sampling: SamplingParams::default(),
                stop: vec![],
                // Every (adapters + 1)-th request runs on the base model alone.
                adapter: if mixed { adapters.get(i % (adapters.len() + 1)).cloned() } else { None },
            })
            .collect()
    };
    let time = |reqs: &[GenerateRequest]| -> f64 {
        pipeline.generate_batch(reqs).expect("warm-up");
        let mut t: Vec<f64> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                pipeline.generate_batch(reqs).expect("generate");
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let base = time(&requests(false));
    let mixed = time(&requests(true));
    println!(
        "model={model} batch={batch} tokens={tokens} adapters={} runs={runs}\n  no adapters    {base:.1} ms (median)\n  mixed adapters {mixed:.1} ms (median), {:.2}x",
        adapters.len(),
        mixed / base
    );
}
