//! Cost of unmerged LoRA: one batch of requests with a mix of adapters (and some without)
//! against the same batch with no adapters, median wall time over several runs.
//!
//!     cargo bench --bench adapters
//!     QWEN_OCR_BENCH_MODEL=DIR QWEN_OCR_BENCH_ADAPTERS=a,b,c cargo bench --bench adapters
//!
//! At real shapes: `QWEN_OCR_BENCH_RANDOM_ADAPTERS=4` writes that many random rank-8 adapters on
//! every language-model projection of the model (under `target/bench-adapters/`) and uses them;
//! `QWEN_OCR_BENCH_IMAGE=none` sends text-only requests; `QWEN_OCR_BENCH_QUANT` picks weights.

#[path = "support/settings.rs"]
mod settings;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use qwen_ocr_model::decoding::sampling::SamplingParams;
use qwen_ocr_model::preprocess::image::ImageOptions;
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::{GenerateRequest, LoadOptions, Pipeline, Quant};
use settings::env_or;

/// `count` PEFT adapters of rank 8 on every decoder projection of `pipeline`'s model.
fn random_adapters(pipeline: &Pipeline, count: usize) -> Vec<String> {
    let shapes = pipeline.model.adaptable_modules();
    let t = &pipeline.model.config().text;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../target/bench-adapters/h{}-l{}-i{}", t.hidden_size, t.num_hidden_layers, t.intermediate_size));
    (0..count)
        .map(|j| {
            let dir: PathBuf = root.join(format!("r8-{j}"));
            if !dir.join("adapter_model.safetensors").is_file() {
                std::fs::create_dir_all(&dir).unwrap();
                let config = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]});
                std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
                let mut tensors = HashMap::new();
                for (module, &(out, inp)) in shapes.iter().filter(|(m, _)| m.starts_with("model.layers.")) {
                    let randn =
                        |dims: (usize, usize)| Tensor::randn(0f32, 0.02, dims, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
                    tensors.insert(format!("base_model.model.{module}.lora_A.weight"), randn((8, inp)));
                    tensors.insert(format!("base_model.model.{module}.lora_B.weight"), randn((out, 8)));
                }
                candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
            }
            dir.display().to_string()
        })
        .collect()
}

fn main() {
    qwen_ocr_model::kernels::threads::pin_cpu_thread_count();
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

    let quant = Quant::parse(&env_or("QWEN_OCR_BENCH_QUANT", "none"), &Device::Cpu).unwrap();
    let pipeline = Pipeline::load(&model, &LoadOptions { quant, ..LoadOptions::default() }).expect("load model");
    let adapter_dirs: Vec<String> = match std::env::var("QWEN_OCR_BENCH_RANDOM_ADAPTERS") {
        Ok(n) => random_adapters(&pipeline, n.parse().expect("QWEN_OCR_BENCH_RANDOM_ADAPTERS")),
        Err(_) => adapter_dirs.split(',').map(str::to_string).collect(),
    };
    let adapters: Vec<_> = adapter_dirs.iter().map(|d| pipeline.model.load_adapter(d, Path::new(d)).expect("load adapter")).collect();
    let images: Vec<_> = match image.as_str() {
        "none" => Vec::new(),
        path => vec![pipeline.preprocess_file(Path::new(path), &ImageOptions::default()).expect("preprocess")],
    };
    let requests = |mixed: bool| -> Vec<GenerateRequest> {
        (0..batch)
            .map(|i| GenerateRequest {
                messages: vec![ChatMessage::user_with_images(images.len(), "Extract the plate number as JSON.")],
                images: images.clone(),
                max_new_tokens: Some(tokens),
                sampling: SamplingParams::default(),
                stop: vec![],
                // Every (adapters + 1)-th request runs on the base model alone.
                adapter: if mixed { adapters.get(i % (adapters.len() + 1)).cloned() } else { None },
                ..Default::default()
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
        "model={model} quant={} batch={batch} tokens={tokens} adapters={} runs={runs}\n  no adapters    {base:.1} ms (median)\n  mixed adapters {mixed:.1} ms (median), {:.2}x",
        quant.as_str(),
        adapters.len(),
        mixed / base
    );
}
