//! A small random Qwen2-VL checkpoint for benchmarks, written on first use under `target/`.
//!
//! The committed tiny fixtures have a 16-wide decoder, so nearly all of their work is the
//! vocabulary projection and per-row overhead. Batching mostly amortises weight reads, so a
//! benchmark of it needs a decoder whose weights matter. This one keeps the tiny fixture's
//! tokenizer, templates and vision tower and widens the decoder (random weights, published
//! layout, bf16 storage).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

const TINY_HIDDEN: usize = 16;
const TINY_INTERMEDIATE: usize = 48;
const TINY_KV: usize = 8;

/// The checkpoint directory for a decoder `hidden` wide with `layers` layers (head size 64,
/// an MLP three times as wide, a quarter as many key/value heads as query heads).
#[allow(dead_code)]
pub fn small_checkpoint(hidden: usize, layers: usize) -> PathBuf {
    decoder_checkpoint(hidden, layers, hidden * 3, (hidden / 64 / 4).max(1))
}

/// Qwen2-0.5B's decoder shape (896 wide, 24 layers, 4864-wide MLP, 14 heads, 2 key/value heads).
#[allow(dead_code)]
pub fn qwen2_0_5b_shaped_checkpoint() -> PathBuf {
    decoder_checkpoint(896, 24, 4864, 2)
}

/// The checkpoint directory for a decoder of the given shape (head size 64).
pub fn decoder_checkpoint(hidden: usize, layers: usize, intermediate: usize, kv_heads: usize) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tiny = root.join("tests/fixtures/tiny-tied");
    let suffix = if intermediate == hidden * 3 && kv_heads == (hidden / 64 / 4).max(1) {
        String::new()
    } else {
        format!("-i{intermediate}-kv{kv_heads}")
    };
    let dir = root.join(format!("target/bench-checkpoints/h{hidden}-l{layers}{suffix}"));
    if dir.join("model.safetensors").is_file() {
        return dir;
    }
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&tiny).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name != "model.safetensors" && name != "config.json" {
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
    let (heads, head_dim) = (hidden / 64, 64);
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    config["hidden_size"] = hidden.into();
    config["intermediate_size"] = intermediate.into();
    config["num_hidden_layers"] = layers.into();
    config["num_attention_heads"] = heads.into();
    config["num_key_value_heads"] = kv_heads.into();
    // Qwen2-VL's split of the rotary half-dimension (64 of 128) into t/h/w, scaled to 32.
    config["rope_scaling"]["mrope_section"] = serde_json::json!([8, 12, 12]);
    config["vision_config"]["hidden_size"] = hidden.into();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();

    let resize = |d: usize| match d {
        TINY_HIDDEN => hidden,
        TINY_INTERMEDIATE => intermediate,
        TINY_KV => kv_heads * head_dim,
        other => other,
    };
    let tiny_tensors = candle_core::safetensors::load(tiny.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors = HashMap::new();
    for (name, tensor) in tiny_tensors {
        if name.starts_with("model.layers.") && !name.starts_with("model.layers.0.") {
            continue; // every layer is written from layer 0's shapes below
        }
        let dims: Vec<usize> = if name.starts_with("model.") {
            tensor.dims().iter().map(|&d| resize(d)).collect()
        } else if name.starts_with("visual.merger.mlp.2.") {
            // The merger's output is the decoder's input width.
            let mut dims = tensor.dims().to_vec();
            dims[0] = hidden;
            dims
        } else {
            tensors.insert(name, tensor);
            continue;
        };
        let make = || {
            let norm = name.ends_with("layernorm.weight") || name == "model.norm.weight";
            let t = if norm {
                Tensor::ones(dims.as_slice(), DType::F32, &Device::Cpu)
            } else {
                Tensor::randn(0f32, 0.02, dims.as_slice(), &Device::Cpu)
            };
            t.and_then(|t| t.to_dtype(DType::BF16)).unwrap()
        };
        match name.strip_prefix("model.layers.0.") {
            Some(rest) => (0..layers).for_each(|layer| {
                tensors.insert(format!("model.layers.{layer}.{rest}"), make());
            }),
            None => {
                tensors.insert(name.clone(), make());
            }
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}
