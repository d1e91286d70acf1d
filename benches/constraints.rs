//! Cost of JSON-schema constraints: tokens/s of one batch of requests decoded with a schema
//! against the same batch without, median over several runs. Masks are computed on another
//! thread while the model runs each step, so the goal is under 10% slower.
//!
//!     cargo bench --bench constraints
//!     QWEN_OCR_BENCH_MODEL=DIR QWEN_OCR_BENCH_QUANT=q8_0 cargo bench --bench constraints
//!
//! The schema asks for one long string field, so constrained sequences run to the token limit
//! like the unconstrained ones and both batches generate the same number of tokens.

#[path = "support/settings.rs"]
mod settings;

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use qwen_ocr_model::preprocess::image::ImageOptions;
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::{GenerateRequest, LoadOptions, Pipeline, Quant};
use settings::{env_or, median, SEED_PROMPT};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let model = env_or("QWEN_OCR_BENCH_MODEL", root.join("tiny-tied").to_str().unwrap());
    let batch: usize = env_or("QWEN_OCR_BENCH_BATCH", "8").parse().unwrap();
    let tokens: usize = env_or("QWEN_OCR_BENCH_TOKENS", "48").parse().unwrap();
    let runs: usize = env_or("QWEN_OCR_BENCH_RUNS", "5").parse().unwrap();
    let image = env_or("QWEN_OCR_BENCH_IMAGE", root.join("images/plate.png").to_str().unwrap());
    let quant = Quant::parse(&env_or("QWEN_OCR_BENCH_QUANT", "none"), &Device::Cpu).unwrap();
    let pipeline = Pipeline::load(&model, &LoadOptions { quant, ..LoadOptions::default() }).expect("load");
    let image = pipeline.preprocess_file(Path::new(&image), &ImageOptions::default()).expect("image");
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "text": { "type": "string", "minLength": tokens * 8 } },
        "required": ["text"]
    });
    let grammar = pipeline.vocabulary().expect("vocabulary").compile(&schema).expect("schema");
    let requests = |constrained: bool| -> Vec<GenerateRequest> {
        (0..batch)
            .map(|i| GenerateRequest {
                messages: vec![ChatMessage::user_with_images(1, &format!("{SEED_PROMPT} Copy {i}."))],
                images: vec![image.clone()],
                max_new_tokens: Some(tokens),
                grammar: constrained.then(|| grammar.clone()),
                ..Default::default()
            })
            .collect()
    };
    let rate = |reqs: &[GenerateRequest]| -> f64 {
        pipeline.generate_batch(reqs).expect("warm-up");
        median(
            (0..runs)
                .map(|_| {
                    let started = Instant::now();
                    let out = pipeline.generate_batch(reqs).expect("generate");
                    out.iter().map(|o| o.token_ids.len()).sum::<usize>() as f64 / started.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let free = rate(&requests(false));
    let constrained = rate(&requests(true));
    println!(
        "model={model} quant={} batch={batch} tokens={tokens} runs={runs}\n  without schema {free:.1} tokens/s (median)\n  with schema    {constrained:.1} tokens/s (median), {:+.1}%",
        quant.as_str(),
        (constrained / free - 1.0) * 100.0
    );
}
