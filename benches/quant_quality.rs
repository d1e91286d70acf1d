//! Quantized against exact (f32) weights: per checkpoint and quantization, the share of
//! positions with the same most likely next token, the mean KL divergence of the next-token
//! distributions and the logits' relative error, over 32 greedy tokens on two images (see
//! `qwen_ocr_model::quality`). Runs the committed tiny checkpoints of every family, the 512-wide random one
//! (written under `target/` on first use) and, with `QWEN_OCR_BENCH_MODEL`, any other.
//!
//!     cargo bench --bench quant_quality

#[path = "support/settings.rs"]
mod settings;

#[path = "support/random_checkpoint.rs"]
mod random_checkpoint;

use std::path::Path;

use qwen_ocr_model::decoding::sampling::SamplingParams;
use qwen_ocr_model::preprocess::image::ImageOptions;
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::quality::compare;
use qwen_ocr_model::{GenerateRequest, LoadOptions, Pipeline, Quant};
use settings::SEED_PROMPT;

fn main() {
    qwen_ocr_model::kernels::threads::pin_cpu_thread_count();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fixtures = root.join("tests/fixtures");
    let mut models: Vec<String> = ["tiny-tied", "tiny-untied-sharded", "tiny-qwen2_5_vl", "tiny-qwen3_vl"]
        .iter()
        .map(|m| fixtures.join(m).display().to_string())
        .collect();
    models.push(random_checkpoint::small_checkpoint(512, 8).display().to_string());
    if let Ok(model) = std::env::var("QWEN_OCR_BENCH_MODEL") {
        models.push(model);
    }
    for model in &models {
        let exact = Pipeline::load(model, &LoadOptions::default()).expect("load");
        for quant in [Quant::Q8_0, Quant::Q4K] {
            let quantized = Pipeline::load(model, &LoadOptions { quant, ..LoadOptions::default() }).expect("load quantized");
            for image in ["plate.png", "photo.jpg"] {
                let img = exact.preprocess_file(&fixtures.join("images").join(image), &ImageOptions::default()).unwrap();
                let request = GenerateRequest {
                    messages: vec![ChatMessage::user_with_images(1, SEED_PROMPT)],
                    images: vec![img],
                    max_new_tokens: None,
                    sampling: SamplingParams::default(),
                    stop: vec![],
                    adapter: None,
                    ..Default::default()
                };
                let a = compare(&exact, &quantized, &request, 32).unwrap();
                println!("{}", serde_json::json!({ "model": model, "quant": quant.as_str(), "image": image, "agreement": a }));
            }
        }
    }
}
