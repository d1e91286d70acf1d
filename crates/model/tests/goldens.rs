//! The model against transformers: prompt ids, preprocessing and greedy tokens on the tiny
//! checkpoints that `tests/fixtures/make_fixtures.py` wrote with transformers' own outputs.

use std::path::{Path, PathBuf};

use qwen_ocr_model::config::PreprocessorConfig;
use qwen_ocr_model::decoding::sampling::SamplingParams;
use qwen_ocr_model::preprocess::image::{self, ImageOptions, PreprocessedImage};
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::{GenerateRequest, LoadOptions, Pipeline};
use serde_json::Value;

/// Below this top-1/top-2 logit gap, f32 rounding differences may legitimately flip a choice.
const TIE_MARGIN: f64 = 2e-3;
/// One 8-bit level after normalisation (the smallest std is about 0.26).
const ONE_LEVEL: f32 = 1.0 / 255.0 / 0.26;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Qwen2-VL's goldens (`goldens.json`), or another family's (`goldens-FAMILY.json`).
fn goldens_of(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(file)).unwrap()).unwrap()
}

fn goldens() -> Value {
    goldens_of("goldens.json")
}

fn load(checkpoint: &str) -> Pipeline {
    Pipeline::load(fixtures().join(checkpoint).to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn preprocess(pipeline: &Pipeline, names: &[Value]) -> Vec<PreprocessedImage> {
    names
        .iter()
        .map(|n| pipeline.preprocess_file(&fixtures().join("images").join(n.as_str().unwrap()), &ImageOptions::default()).unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Every golden case of one checkpoint: same prompt ids, grids and greedy tokens as transformers.
fn check_checkpoint(name: &str) {
    check_checkpoint_in("goldens.json", name);
}

fn check_checkpoint_in(file: &str, name: &str) {
    let goldens = goldens_of(file);
    let cases = goldens["checkpoints"][name].as_object().unwrap();
    assert!(cases.len() >= 7, "goldens for {name} are incomplete");
    check_cases(&load(name), name, cases, None, goldens["max_new_tokens"].as_u64().unwrap() as usize);
}

/// Every adapter of one checkpoint against transformers + peft.
fn check_adapters(name: &str) {
    check_adapters_in("goldens.json", name, 4);
}

fn check_adapters_in(file: &str, name: &str, at_least: usize) {
    let goldens = goldens_of(file);
    let pipeline = load(name);
    let adapters = goldens["adapters"][name].as_object().unwrap();
    assert!(adapters.len() >= at_least, "adapter goldens for {name} are incomplete");
    for (adapter_name, golden) in adapters {
        let dir = fixtures().join("adapters").join(name).join(adapter_name);
        let adapter = pipeline.model.load_adapter(adapter_name, &dir).unwrap();
        let matched: usize = adapter.matched.values().sum();
        assert_eq!(matched * 2, golden["tensors"].as_u64().unwrap() as usize, "{adapter_name}: every tensor maps to a module");
        let label = format!("{name}+{adapter_name}");
        check_cases(
            &pipeline,
            &label,
            golden["cases"].as_object().unwrap(),
            Some(adapter),
            goldens["max_new_tokens"].as_u64().unwrap() as usize,
        );
    }
}

fn check_cases(
    pipeline: &Pipeline,
    name: &str,
    cases: &serde_json::Map<String, Value>,
    adapter: Option<std::sync::Arc<qwen_ocr_model::adapters::lora::LoraAdapter>>,
    max_new: usize,
) {
    for (case, golden) in cases {
        let images = preprocess(pipeline, golden["images"].as_array().unwrap());
        let messages = vec![ChatMessage::user_with_images(images.len(), golden["prompt"].as_str().unwrap())];
        assert_eq!(pipeline.prompt.render(&messages).unwrap(), golden["prompt_text"].as_str().unwrap(), "{name}/{case}: rendered template");
        assert_eq!(pipeline.encode_prompt(&messages, &images).unwrap(), ids(&golden["prompt_ids"]), "{name}/{case}: prompt ids");

        let request = GenerateRequest {
            messages,
            images,
            max_new_tokens: Some(max_new),
            sampling: SamplingParams::default(),
            stop: vec![],
            adapter: adapter.clone(),
            ..Default::default()
        };
        let out = pipeline.generate(&request).unwrap();
        let grids: Vec<Value> = out.image_grid_thw.iter().map(|g| serde_json::json!(g)).collect();
        assert_eq!(Value::Array(grids), golden["image_grid_thw"], "{name}/{case}: image_grid_thw");

        let expected = ids(&golden["token_ids"]);
        let margins: Vec<f64> = golden["top1_minus_top2"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        match out.token_ids.iter().zip(&expected).position(|(a, b)| a != b) {
            None => {
                assert_eq!(out.token_ids, expected, "{name}/{case}: length differs");
                assert_eq!(out.text, golden["text"].as_str().unwrap(), "{name}/{case}: decoded text");
            }
            Some(step) => assert!(
                margins[step] < TIE_MARGIN,
                "{name}/{case}: diverged at step {step} where transformers' top-1 led by {} (ours {:?}, expected {:?})",
                margins[step],
                out.token_ids,
                expected
            ),
        }
    }
}

#[test]
fn tied_single_file_bf16_checkpoint_matches_transformers() {
    check_checkpoint("tiny-tied");
}

#[test]
fn untied_sharded_f16_nested_config_checkpoint_matches_transformers() {
    check_checkpoint("tiny-untied-sharded");
}

#[test]
fn tied_checkpoint_adapters_match_transformers_and_peft() {
    check_adapters("tiny-tied");
}

#[test]
fn untied_checkpoint_adapters_match_transformers_and_peft() {
    check_adapters("tiny-untied-sharded");
}

#[test]
fn preprocessing_matches_transformers_pixel_values() {
    check_preprocessing("goldens.json", "pixels.safetensors", "tiny-tied");
}

/// transformers' PIL image processor, as configured by `checkpoint`, against ours.
fn check_preprocessing(goldens_file: &str, pixels_file: &str, checkpoint: &str) {
    let goldens = goldens_of(goldens_file);
    let pixels = candle_core::safetensors::load(fixtures().join(pixels_file), &candle_core::Device::Cpu).unwrap();
    let config = load(checkpoint).preprocessor;
    let cases = goldens["preprocess"].as_object().unwrap();
    assert!(cases.len() >= 8);
    for (key, golden) in cases {
        let file = golden["image"].as_str().unwrap();
        let bytes = std::fs::read(fixtures().join("images").join(file)).unwrap();
        let max_pixels = golden["max_pixels"].as_u64();
        // transformers takes a longest_edge below the processor's shortest_edge (scaling down
        // first); we refuse min_pixels > max_pixels, so such a case lowers the minimum with it.
        let min_pixels = max_pixels.filter(|&m| m < config.min_pixels);
        let options = ImageOptions { max_pixels, min_pixels, ..Default::default() };
        let out = image::preprocess(&bytes, &config, &options).unwrap();
        assert_eq!(serde_json::json!(out.grid_thw), golden["grid_thw"], "{key}: grid_thw");
        assert_eq!(serde_json::json!(out.resized), golden["resized"], "{key}: resized");
        let expected: Vec<f32> = pixels[key].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(out.pixel_values.len(), expected.len(), "{key}: pixel count");
        let mut levels: Vec<f32> = out.pixel_values.iter().zip(&expected).map(|(a, b)| (a - b).abs() / ONE_LEVEL).collect();
        levels.sort_by(f32::total_cmp);
        let max = levels[levels.len() - 1];
        if file.ends_with(".png") {
            // PIL's RGB conversion, bicubic and normalisation reproduced: identical, not just close.
            assert!(max * ONE_LEVEL <= 1e-6, "{key}: PNG pixel values differ by {max:.2} levels");
        } else {
            // JPEG decoders (zune-jpeg here, libjpeg-turbo in PIL) round IDCT and chroma
            // upsampling differently: close on average, a few levels off at sharp colour edges.
            let mean = levels.iter().sum::<f32>() / levels.len() as f32;
            let p99 = levels[levels.len() * 99 / 100];
            assert!(mean <= 1.0 && p99 <= 3.0 && max <= 16.0, "{key}: JPEG differs by mean {mean:.2}, p99 {p99:.2}, max {max:.2} levels");
        }
    }
}

#[test]
fn half_way_sizes_round_to_even_like_python() {
    let config = PreprocessorConfig::default();
    // 126x70: 4.5 and 2.5 patches of 28 both round down to even.
    assert_eq!(image::smart_resize(126, 70, config.factor(), config.min_pixels, config.max_pixels).unwrap(), (112, 56));
}

/// Sequences with three different adapters and none, in one batch, each get the tokens they get
/// alone (and that transformers + peft give).
#[test]
fn mixed_adapter_batch_matches_each_sequence_alone() {
    let goldens = goldens();
    let name = "tiny-untied-sharded";
    let pipeline = load(name);
    let max_new = goldens["max_new_tokens"].as_u64().unwrap() as usize;
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for (adapter, case) in [
        (Some("lm-qv-r4"), "no_resize"),
        (None, "two_images"),
        (Some("vision-merger-pattern"), "resized"),
        (Some("lm-all-rslora-regex"), "text_only"),
        (None, "palette"),
        (Some("lm-qv-r4"), "grayscale"),
    ] {
        let golden = match adapter {
            Some(a) => &goldens["adapters"][name][a]["cases"][case],
            None => &goldens["checkpoints"][name][case],
        };
        let images = preprocess(&pipeline, golden["images"].as_array().unwrap());
        let adapter = adapter.map(|a| pipeline.model.load_adapter(a, &fixtures().join("adapters").join(name).join(a)).unwrap());
        requests.push(GenerateRequest {
            messages: vec![ChatMessage::user_with_images(images.len(), golden["prompt"].as_str().unwrap())],
            images,
            max_new_tokens: Some(max_new),
            sampling: SamplingParams::default(),
            stop: vec![],
            adapter,
            ..Default::default()
        });
        expected.push(ids(&golden["token_ids"]));
    }
    let batched = pipeline.generate_batch(&requests).unwrap();
    for ((request, out), expected) in requests.iter().zip(&batched).zip(&expected) {
        let alone = pipeline.generate(request).unwrap();
        assert_eq!(out.token_ids, alone.token_ids);
        assert_eq!(&out.token_ids, expected);
    }
}

/// Streaming deltas add up to the full decode and never carry half a character.
#[test]
fn incremental_decoding_never_splits_characters() {
    use qwen_ocr_model::decoding::detokenize::IncrementalDecoder;
    let pipeline = load("tiny-tied");
    let tokenizer = pipeline.prompt.tokenizer();
    let text = "Vehicle Sr No: KA-01 é中文 ✓ 🚗🚙 {\"engine\": \"4D56-ÄÖ\"}";
    let mut tokens = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    tokens.insert(3, 151645); // a special token in the middle is skipped
    let mut decoder = IncrementalDecoder::new();
    let mut streamed = String::new();
    for &id in &tokens {
        if let Some(delta) = decoder.push(tokenizer, id).unwrap() {
            assert!(!delta.contains('\u{FFFD}'), "split character in {delta:?}");
            streamed.push_str(&delta);
        }
    }
    assert_eq!(streamed, text);
    // Every golden's generated ids stream to the same text as decoding them at once.
    for cases in goldens()["checkpoints"].as_object().unwrap().values() {
        for golden in cases.as_object().unwrap().values() {
            let mut decoder = IncrementalDecoder::new();
            let mut streamed = String::new();
            for id in ids(&golden["token_ids"]) {
                streamed.push_str(&decoder.push(tokenizer, id).unwrap().unwrap_or_default());
            }
            let full = pipeline.prompt.decode(&ids(&golden["token_ids"])).unwrap();
            assert_eq!(streamed, full.trim_end_matches('\u{FFFD}'));
        }
    }
}

#[test]
fn qwen2_5_vl_windowed_checkpoint_matches_transformers() {
    check_checkpoint_in("goldens-qwen2_5_vl.json", "tiny-qwen2_5_vl");
}

#[test]
fn qwen2_5_vl_adapters_match_transformers_and_peft() {
    check_adapters_in("goldens-qwen2_5_vl.json", "tiny-qwen2_5_vl", 6);
}

#[test]
fn qwen2_5_vl_preprocessing_matches_transformers_pixel_values() {
    check_preprocessing("goldens-qwen2_5_vl.json", "pixels-qwen2_5_vl.safetensors", "tiny-qwen2_5_vl");
}

#[test]
fn qwen3_vl_deepstack_checkpoint_matches_transformers() {
    check_checkpoint_in("goldens-qwen3_vl.json", "tiny-qwen3_vl");
}

#[test]
fn qwen3_vl_adapters_match_transformers_and_peft() {
    check_adapters_in("goldens-qwen3_vl.json", "tiny-qwen3_vl", 4);
}

#[test]
fn qwen3_vl_preprocessing_matches_transformers_pixel_values() {
    check_preprocessing("goldens-qwen3_vl.json", "pixels-qwen3_vl.safetensors", "tiny-qwen3_vl");
}

/// The fixtures still make what differs run: several attention windows per image and a
/// full-attention block (Qwen2.5-VL); DeepStack inside the depth and a position table unlike any
/// image's grid (Qwen3-VL).
#[test]
fn family_fixtures_exercise_what_differs() {
    use qwen_ocr_model::families::VisionConfig;
    let qwen2_5 = load("tiny-qwen2_5_vl");
    let VisionConfig::Qwen2_5VL(v) = &qwen2_5.model.config().vision else { panic!("not Qwen2.5-VL") };
    assert!(!v.fullatt_block_indexes.is_empty() && v.fullatt_block_indexes.len() < v.depth);
    let merged = |name: &str, p: &Pipeline| {
        let g = preprocess(p, &[Value::from(name)])[0].grid_thw;
        (g[1] / 2, g[2] / 2)
    };
    let (rows, cols) = merged("resized.png", &qwen2_5);
    assert!(rows.div_ceil(v.window_tokens()) * cols.div_ceil(v.window_tokens()) > 1, "one window per image");

    let qwen3 = load("tiny-qwen3_vl");
    let VisionConfig::Qwen3VL(v) = &qwen3.model.config().vision else { panic!("not Qwen3-VL") };
    assert!(!v.deepstack_visual_indexes.is_empty() && v.deepstack_visual_indexes.iter().all(|&i| i < v.depth - 1));
    assert!(v.deepstack_visual_indexes.len() < qwen3.model.config().text.num_hidden_layers);
    for image in ["plate.png", "resized.png"] {
        let g = preprocess(&qwen3, &[Value::from(image)])[0].grid_thw;
        assert!(g[1] != v.position_grid || g[2] != v.position_grid, "{image}: the grid equals the position table");
    }
}

/// The published generation_config.json is applied: Qwen2.5-VL's repetition penalty of 1.05
/// changes greedy answers, as it does in transformers.
#[test]
fn generation_config_repetition_penalty_is_applied_as_transformers_does() {
    for (file, name) in [("goldens-qwen2_5_vl.json", "tiny-qwen2_5_vl"), ("goldens-qwen3_vl.json", "tiny-qwen3_vl")] {
        let goldens = goldens_of(file);
        let pipeline = load(name);
        let mut checked = 0;
        for (case, golden) in goldens["checkpoints"][name].as_object().unwrap() {
            let Some(expected) = golden.get("token_ids_with_generation_config") else { continue };
            let applied = &golden["generation_config_applied"];
            let sampling = SamplingParams { repetition_penalty: applied["repetition_penalty"].as_f64().unwrap(), ..Default::default() };
            assert_eq!(sampling.repetition_penalty, pipeline.default_sampling().repetition_penalty, "{name}: the checkpoint's penalty");
            let images = preprocess(&pipeline, golden["images"].as_array().unwrap());
            let request = GenerateRequest {
                messages: vec![ChatMessage::user_with_images(images.len(), golden["prompt"].as_str().unwrap())],
                images,
                max_new_tokens: Some(goldens["max_new_tokens"].as_u64().unwrap() as usize),
                sampling,
                ..Default::default()
            };
            assert_eq!(pipeline.generate(&request).unwrap().token_ids, ids(expected), "{name}/{case} with the generation config");
            checked += 1;
        }
        assert!(checked >= 1, "{name}: no generation-config golden");
    }
}
