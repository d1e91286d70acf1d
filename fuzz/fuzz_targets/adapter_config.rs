//! Adapter configuration text: the server's TOML file (its `[adapters.NAME]` tables) and its
//! checks, an adapter folder's `qwen-ocr.toml` profile and its checks, and PEFT's
//! `adapter_config.json` with the module selection LoRA loading does with it. Every input goes
//! to all three parsers.
//!
//! Input: the file's text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use qwen_ocr_model::adapters::lora::AdapterConfig;
use qwen_ocr_server::adapter_folder::parse_profile;
use qwen_ocr_server::config::ServerConfig;
use serde_json::Value;

/// Module paths as both weight layouts save them, language and vision.
const MODULES: [&str; 5] = [
    "model.layers.0.self_attn.q_proj",
    "model.language_model.layers.1.mlp.down_proj",
    "visual.blocks.0.attn.qkv",
    "model.visual.blocks.1.mlp.fc1",
    "visual.merger.mlp.0",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Parsed, then checked as a whole as the start does (which must refuse, never panic).
    let config = ServerConfig::from_toml(text, Path::new("/etc/qwen-ocr"));
    if let Ok(config) = &config {
        let _ = config.validate();
    }
    let dir = Path::new("/adapters/a");
    if let Ok(profile) = parse_profile(text, dir) {
        assert_eq!(profile.path, dir, "a profile's path is its folder");
        let _ = profile.settings().check(Some("a"), &ServerConfig::default());
    }
    let Ok(Ok(peft)) = serde_json::from_str::<Value>(text).map(|v| AdapterConfig::from_value(&v)) else { return };
    for module in MODULES {
        peft.targets(module);
        let (r, alpha) = peft.rank_and_alpha(module);
        // Loading divides alpha by the rank and shapes the weights by it.
        assert!(r > 0 && alpha.is_finite(), "{module}: r={r}, alpha={alpha}");
    }
});
