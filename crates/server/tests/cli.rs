//! The `qwen-ocr` binary as scripts use it: JSON output of `generate` and `preprocess`, and a
//! one-line error with a non-zero exit for every kind of bad input.

mod common;

use std::process::{Command, Output};

use common::{fixtures, hub_cache, image_path, qwen_ocr};
use serde_json::Value;

fn image(name: &str) -> String {
    image_path(name).display().to_string()
}

fn checkpoint(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

fn goldens() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("goldens.json")).unwrap()).unwrap()
}

/// Runs `generate --json` on `model` with a golden case's prompt and images (plus `extra`
/// flags) and returns the printed object.
fn generate_golden(model: &str, golden: &Value, extra: &[&str]) -> Value {
    let max_tokens = goldens()["max_new_tokens"].to_string();
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--quant",
        "none",
        "--prompt",
        golden["prompt"].as_str().unwrap(),
        "--max-tokens",
        &max_tokens,
        "--json",
    ];
    let images: Vec<String> = golden["images"].as_array().unwrap().iter().map(|i| image(i.as_str().unwrap())).collect();
    for img in &images {
        args.extend(["--image", img.as_str()]);
    }
    args.extend(extra);
    let out = qwen_ocr(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// Asserts a clean failure: non-zero exit, one `error:` line on stderr, no panic.
fn assert_clean_error(out: &Output, mentions: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].to_lowercase().contains(&mentions.to_lowercase()), "error should mention `{mentions}`: {stderr}");
}

#[test]
fn generate_json_matches_the_transformers_golden() {
    let goldens = goldens();
    for (ckpt, case) in [("tiny-tied", "two_images"), ("tiny-untied-sharded", "text_only"), ("tiny-untied-sharded", "rgba")] {
        let golden = &goldens["checkpoints"][ckpt][case];
        let json = generate_golden(&checkpoint(ckpt), golden, &[]);
        assert_eq!(json["token_ids"], golden["token_ids"], "{ckpt}/{case}");
        assert_eq!(json["text"], golden["text"], "{ckpt}/{case}");
        assert_eq!(json["prompt_tokens"].as_u64().unwrap() as usize, golden["prompt_ids"].as_array().unwrap().len());
        assert_eq!(json["image_grid_thw"], golden["image_grid_thw"]);
    }
}

#[test]
fn generate_without_json_prints_the_text() {
    let out = qwen_ocr(&["generate", "--model", &checkpoint("tiny-tied"), "--prompt", "hi", "--max-tokens", "3", "--temperature", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').contains('{'));
}

#[test]
fn preprocess_reports_grid_and_dumps_transformers_pixel_values() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("pv.safetensors");
    let out =
        qwen_ocr(&["preprocess", "--model", &checkpoint("tiny-tied"), "--image", &image("gray.png"), "--dump", dump.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let golden = &goldens()["preprocess"]["gray.png"];
    assert_eq!(json["grid_thw"], golden["grid_thw"]);
    assert_eq!(json["resized"], golden["resized"]);
    assert_eq!(json["visual_tokens"], golden["visual_tokens"]);
    let ours = candle_core::safetensors::load(&dump, &candle_core::Device::Cpu).unwrap();
    let theirs = candle_core::safetensors::load(fixtures().join("pixels.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (a, b) = (&ours["pixel_values"], &theirs["gray.png"]);
    assert_eq!(a.dims(), b.dims());
    let diff: f32 = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(diff <= 1e-6, "pixel values differ by {diff}");
}

#[test]
fn preprocess_honours_max_pixels_override() {
    let out = qwen_ocr(&["preprocess", "--model", &checkpoint("tiny-tied"), "--image", &image("large.png"), "--max-pixels", "12544"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["grid_thw"], goldens()["preprocess"]["large.png@max_pixels=12544"]["grid_thw"]);
}

#[test]
fn missing_files_fail_cleanly() {
    assert_clean_error(&qwen_ocr(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]), "no such model directory");
    assert_clean_error(
        &qwen_ocr(&["generate", "--model", &checkpoint("tiny-tied"), "--image", "/nonexistent.png", "--prompt", "x"]),
        "nonexistent.png",
    );
    assert_clean_error(&qwen_ocr(&["preprocess", "--model", &checkpoint("tiny-tied"), "--image", "/nonexistent.png"]), "nonexistent.png");
}

#[test]
fn offline_hub_id_that_is_not_cached_fails_cleanly() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-ocr"))
        .args(["generate", "--model", "Qwen/Qwen2-VL-2B-Instruct", "--prompt", "x"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    assert_clean_error(&out, "HF_HUB_OFFLINE");
}

/// A copy of the tied checkpoint whose `file` is replaced by `contents` (or removed).
fn broken_checkpoint(file: &str, contents: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("tiny-tied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    match contents {
        Some(c) => std::fs::write(dir.path().join(file), c).unwrap(),
        None => std::fs::remove_file(dir.path().join(file)).unwrap(),
    }
    dir
}

#[test]
fn broken_checkpoints_fail_cleanly() {
    let cases = [
        ("config.json", Some("{ not json"), "config.json"),
        ("config.json", Some(r#"{"hidden_size": 16}"#), "config.json"),
        ("model.safetensors", Some("garbage"), "safetensors"),
        ("model.safetensors", None, "model.safetensors"),
        ("tokenizer.json", Some("{}"), "tokenizer"),
        ("tokenizer_config.json", Some("{}"), "chat template"),
    ];
    for (file, contents, mentions) in cases {
        let dir = broken_checkpoint(file, contents);
        let out = qwen_ocr(&["generate", "--model", dir.path().to_str().unwrap(), "--prompt", "x"]);
        assert_clean_error(&out, mentions);
    }
}

/// A PNG whose header declares `width` x `height` but carries no pixel data.
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    // A few bytes of image data, so decoders get past the header as with a real bomb.
    let idat = b"IDAT\x78\x9c\x63\x00\x00\x00\x01\x00\x01";
    png.extend(((idat.len() - 4) as u32).to_be_bytes());
    png.extend(idat);
    png.extend(crc32(idat).to_be_bytes());
    png.extend(0u32.to_be_bytes());
    png.extend(b"IEND");
    png.extend(crc32(b"IEND").to_be_bytes());
    png
}

#[test]
fn bad_images_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    };
    let plate = std::fs::read(image("plate.png")).unwrap();
    let huge = write("huge.png", &png_header_only(100_000, 100_000));
    let truncated = write("truncated.png", &plate[..plate.len() / 2]);
    let text = write("notes.png", b"this is not an image at all");
    let thin = write("thin.png", &{
        let img = image::RgbImage::new(2000, 8);
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    });
    let model = checkpoint("tiny-tied");
    for (path, mentions) in [(&huge, "over the limit"), (&truncated, "corrupt"), (&text, "unsupported"), (&thin, "aspect ratio")] {
        assert_clean_error(&qwen_ocr(&["generate", "--model", &model, "--image", path, "--prompt", "x"]), mentions);
        assert_clean_error(&qwen_ocr(&["preprocess", "--model", &model, "--image", path]), mentions);
    }
    // The pixel limit is configurable and checked on the declared size.
    assert_clean_error(
        &qwen_ocr(&["preprocess", "--model", &model, "--image", &image("plate.png"), "--max-image-pixels", "100"]),
        "over the limit",
    );
}

#[test]
fn bad_options_fail_cleanly() {
    let model = checkpoint("tiny-tied");
    assert_clean_error(&qwen_ocr(&["generate", "--model", &model, "--prompt", "x", "--dtype", "f64"]), "invalid value 'f64' for '--dtype");
    assert_clean_error(&qwen_ocr(&["generate", "--model", &model, "--prompt", "x", "--device", "tpu"]), "unknown device");
    assert_clean_error(&qwen_ocr(&["generate", "--model", &model, "--prompt", "x", "--top-p", "0"]), "top_p");
    assert_clean_error(&qwen_ocr(&["generate", "--model", &model, "--prompt", "x", "--max-tokens", "0"]), "max-tokens");
}

#[test]
fn stop_string_ends_generation_and_is_cut_from_the_text() {
    let goldens = goldens();
    let golden = &goldens["checkpoints"]["tiny-tied"]["resized"];
    let full = golden["text"].as_str().unwrap();
    let stop: String = full.chars().skip(full.chars().count() / 2).take(2).collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let json = generate_golden(&checkpoint("tiny-tied"), golden, &["--stop", &stop]);
    assert_eq!(json["text"], expected);
    assert_eq!(json["finish_reason"], "stop");
    assert!(json["token_ids"].as_array().unwrap().len() < 16);
}

#[test]
fn generate_with_adapter_matches_transformers_and_peft() {
    let goldens = goldens();
    let golden = &goldens["adapters"]["tiny-untied-sharded"]["vision-merger-pattern"]["cases"]["no_resize"];
    let adapter = fixtures().join("adapters/tiny-untied-sharded/vision-merger-pattern");
    let json = generate_golden(&checkpoint("tiny-untied-sharded"), golden, &["--adapter", adapter.to_str().unwrap()]);
    assert_eq!(json["token_ids"], golden["token_ids"]);
    assert_clean_error(
        &qwen_ocr(&["generate", "--model", &checkpoint("tiny-tied"), "--adapter", "/nonexistent", "--prompt", "x"]),
        "not a directory",
    );
}

/// The merged f32 checkpoint, run without the adapter, gives the adapter's tokens.
#[test]
fn merged_checkpoint_reproduces_the_adapter() {
    let goldens = goldens();
    for (ckpt, adapter, case) in
        [("tiny-untied-sharded", "vision-merger-pattern", "two_images"), ("tiny-tied", "lm-all-rslora-regex", "rgba")]
    {
        let out_dir = tempfile::tempdir().unwrap();
        let adapter_dir = fixtures().join("adapters").join(ckpt).join(adapter);
        let out = qwen_ocr(&[
            "merge",
            "--model",
            &checkpoint(ckpt),
            "--adapter",
            adapter_dir.to_str().unwrap(),
            "--out",
            out_dir.path().to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let golden = &goldens["adapters"][ckpt][adapter]["cases"][case];
        let json = generate_golden(out_dir.path().to_str().unwrap(), golden, &[]);
        let (ours, expected) = (json["token_ids"].as_array().unwrap(), golden["token_ids"].as_array().unwrap());
        // Folding changes float rounding: a flip is allowed only where transformers' top two tied.
        if let Some(step) = ours.iter().zip(expected).position(|(a, b)| a != b) {
            let margin = golden["top1_minus_top2"][step].as_f64().unwrap();
            assert!(margin < 2e-3, "{ckpt}+{adapter}/{case}: merged output diverged at step {step} (margin {margin})");
        } else {
            assert_eq!(ours, expected);
        }
    }
}

/// transformers 5 saves the template as `chat_template.jinja`; it takes precedence.
#[test]
fn chat_template_jinja_is_found() {
    let goldens = goldens();
    let golden = &goldens["checkpoints"]["tiny-tied"]["text_only"];
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-tied/tokenizer_config.json")).unwrap()).unwrap();
    let template = config.as_object_mut().unwrap().remove("chat_template").unwrap();
    let dir = broken_checkpoint("tokenizer_config.json", Some(&config.to_string()));
    std::fs::write(dir.path().join("chat_template.jinja"), template.as_str().unwrap()).unwrap();
    let json = generate_golden(dir.path().to_str().unwrap(), golden, &[]);
    assert_eq!(json["token_ids"], golden["token_ids"]);
}

/// A hub id resolves through the Hugging Face cache under `HF_HOME` (offline: no network here).
#[test]
fn hub_id_loads_from_the_hf_home_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let files: Vec<_> = std::fs::read_dir(fixtures().join("tiny-untied-sharded")).unwrap().map(|e| e.unwrap().path()).collect();
    hub_cache(home.path(), "tiny/qwen2-vl", &files);
    let golden = &goldens()["checkpoints"]["tiny-untied-sharded"]["text_only"];
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-ocr"))
        .args(["generate", "--model", "tiny/qwen2-vl", "--prompt", golden["prompt"].as_str().unwrap(), "--max-tokens", "16", "--json"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["token_ids"], golden["token_ids"]);
}
