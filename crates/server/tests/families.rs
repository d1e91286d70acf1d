//! Every supported architecture served end to end: the server names what it loaded, a chat
//! completion over HTTP gives transformers' tokens under the checkpoint's own generation
//! config, and a checkpoint of another architecture is refused before the server listens.

mod common;

use std::time::Duration;

use common::*;
use qwen_ocr_server::api::chat::ChatCompletion;
use qwen_ocr_server::api::models::ModelList;
use qwen_ocr_server::api::ops::Ready;
use serde_json::{json, Value};

fn goldens(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(file)).unwrap()).unwrap()
}

#[test]
fn qwen2_5_vl_and_qwen3_vl_serve_transformers_tokens_and_say_what_they_are() {
    for (family, checkpoint) in [("qwen2_5_vl", "tiny-qwen2_5_vl"), ("qwen3_vl", "tiny-qwen3_vl")] {
        // Exact mode: the default q8_0 drifts from transformers after a few tokens on random weights.
        let server = Server::start_model(&fixtures().join(checkpoint).display().to_string(), &["--quant", "none"], &[]);
        let ready: Ready = parse_str(&server.get("/ready").1);
        assert_eq!(ready.architecture, family);
        let models: ModelList = parse_str(&server.get("/v1/models").1);
        assert_eq!(models.data[0].architecture.as_deref(), Some(family));

        // Greedy with the checkpoint's repetition penalty (1.05 for Qwen2.5-VL), as transformers'
        // generate applies its generation_config.
        let golden = &goldens(&format!("goldens-{family}.json"))["checkpoints"][checkpoint]["resized"];
        let tokens = golden["token_ids_with_generation_config"].as_array().unwrap().len();
        let mut body = chat_body(None, &["resized.png"], golden["prompt"].as_str().unwrap(), tokens);
        body["temperature"] = json!(0);
        let (status, reply) = server.post_json("/v1/chat/completions", &body, &[]);
        assert_eq!(status, 200, "{family}: {reply}");
        let reply: ChatCompletion = parse(&reply);
        assert_eq!(reply.choices[0].message.content, golden["text_with_generation_config"].as_str().unwrap(), "{family}");
        assert_eq!(reply.usage.prompt_tokens, golden["prompt_ids"].as_array().unwrap().len(), "{family}");
    }
}

#[test]
fn an_unsupported_architecture_stops_the_start_naming_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("tiny-tied")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config = dir.path().join("config.json");
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    value["model_type"] = json!("llava");
    value["architectures"] = json!(["LlavaForConditionalGeneration"]);
    std::fs::write(&config, value.to_string()).unwrap();

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qwen-ocr"))
        .args(["serve", "--model", dir.path().to_str().unwrap(), "--host", "127.0.0.1", "--port", "0"])
        .env("HF_HUB_OFFLINE", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the server kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(!stderr.contains("listening"), "it listened first: {stderr}");
    for supported in ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] {
        assert!(stderr.contains(supported), "{supported} not named: {stderr}");
    }
}
