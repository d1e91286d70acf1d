//! The checkpoint's JSON configuration files as serde structs: `config.json` (flat as
//! published, or with the language part nested under `text_config` as transformers 5 writes
//! it; the family from `model_type`/`architectures`), `generation_config.json` and
//! `preprocessor_config.json`. A field of the wrong type is an error that names it, never a
//! silent default; the checks that span fields are each struct's `TryFrom`.

mod generation;
mod preprocessor;
mod text;

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

pub use generation::GenerationConfig;
pub use preprocessor::{PreprocessorConfig, CLIP_MEAN, CLIP_STD, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS};
pub use text::{MropeLayout, TextConfig};

use crate::error::{Error, Result};
use crate::families::{Family, VisionConfig};

/// Token ids the model and the prompt builder agree on; read from `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TokenIds {
    #[serde(rename = "image_token_id", default = "TokenIds::default_image")]
    pub image: u32,
    #[serde(rename = "video_token_id", default = "TokenIds::default_video")]
    pub video: u32,
    #[serde(rename = "vision_start_token_id", default = "TokenIds::default_vision_start")]
    pub vision_start: u32,
    #[serde(rename = "vision_end_token_id", default = "TokenIds::default_vision_end")]
    pub vision_end: u32,
}

impl TokenIds {
    // Every family so far numbers its vision tokens the same way.
    fn default_image() -> u32 {
        151655
    }
    fn default_video() -> u32 {
        151656
    }
    fn default_vision_start() -> u32 {
        151652
    }
    fn default_vision_end() -> u32 {
        151653
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tokens: TokenIds,
}

/// What identifies the family.
#[derive(Deserialize)]
struct Identity {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        Self::from_value(&value).map_err(|reason| Error::config("config.json", reason))
    }

    /// The `config.json` of `model` (a directory or a hub id), read and checked: what tells
    /// whether it is a supported architecture before anything else of it is loaded.
    pub fn of_checkpoint(model: &str) -> Result<Self> {
        let path = crate::loading::checkpoint::resolve_file(model, "config.json")?
            .ok_or_else(|| Error::config("config.json", format!("{model} has no config.json")))?;
        Self::from_file(&path)
    }

    pub fn from_value(root: &Value) -> std::result::Result<Self, String> {
        let identity: Identity = from_value(root.clone())?;
        let family = Family::detect(identity.model_type.as_deref(), &identity.architectures)?;
        // transformers 5 nests the language part under `text_config`; published files keep it
        // flat. Its entries win over the top level's (which also holds the token ids).
        let mut merged = root.as_object().cloned().unwrap_or_default();
        if let Some(Value::Object(text)) = root.get("text_config") {
            merged.extend(text.clone());
        }
        let merged = Value::Object(merged);
        let mut text = TextConfig::try_from(from_value::<text::RawTextConfig>(merged.clone()).map_err(|e| format!("text config: {e}"))?)?;
        text.mrope_layout = family.mrope_layout();
        let tokens: TokenIds = from_value(merged)?;
        let vision_node = root.get("vision_config").ok_or("missing `vision_config`")?.clone();
        let vision = family.vision_config(vision_node).map_err(|e| format!("vision_config: {e}"))?;
        if vision.out_hidden_size() != text.hidden_size {
            return Err(format!(
                "the vision tower's output width {} differs from the text hidden_size {}",
                vision.out_hidden_size(),
                text.hidden_size
            ));
        }
        family.check_text(&text)?;
        Ok(Self { family, text, vision, tokens })
    }
}

/// Deserializes `value`, naming the field that did not fit (`rope_scaling.mrope_section[1]: ...`).
pub(crate) fn from_value<T: DeserializeOwned>(value: Value) -> std::result::Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    serde_json::from_str(&text).map_err(|e| Error::config(name, e))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::MropeLayout;

    fn qwen2_vl() -> Value {
        json!({
            "model_type": "qwen2_vl", "hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 100,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
            "vision_config": {"depth": 1, "embed_dim": 16, "num_heads": 2, "hidden_size": 16, "in_chans": 3}
        })
    }

    #[test]
    fn the_family_comes_from_model_type_or_architectures_never_the_name() {
        assert_eq!(ModelConfig::from_value(&qwen2_vl()).unwrap().family, Family::Qwen2VL);
        let mut by_class = qwen2_vl();
        by_class.as_object_mut().unwrap().remove("model_type");
        by_class["architectures"] = json!(["Qwen2VLForConditionalGeneration"]);
        assert_eq!(ModelConfig::from_value(&by_class).unwrap().family, Family::Qwen2VL);
        let mut unknown = qwen2_vl();
        unknown["model_type"] = json!("llava");
        let err = ModelConfig::from_value(&unknown).unwrap_err();
        assert!(err.contains("llava") && err.contains("qwen2_5_vl") && err.contains("Qwen3VLForConditionalGeneration"), "{err}");
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named_not_defaulted() {
        let mut config = qwen2_vl();
        config["rms_norm_eps"] = json!("small");
        let err = ModelConfig::from_value(&config).unwrap_err();
        assert!(err.contains("rms_norm_eps"), "{err}");
        let mut config = qwen2_vl();
        config["vision_config"]["patch_size"] = json!(-14);
        let err = ModelConfig::from_value(&config).unwrap_err();
        assert!(err.contains("vision_config") && err.contains("patch_size"), "{err}");
        let err = GenerationConfig::from_value(&json!({"top_k": "1"})).unwrap_err();
        assert!(err.contains("top_k"), "{err}");
        let defaults = PreprocessorConfig::default();
        let err = PreprocessorConfig::from_value(&json!({"image_mean": [0.5, 0.5]}), &defaults).unwrap_err();
        assert!(err.contains("image_mean"), "{err}");
    }

    #[test]
    fn nested_text_config_wins_over_the_top_level() {
        let mut config = qwen2_vl();
        config["text_config"] = json!({"hidden_size": 16, "num_hidden_layers": 3});
        assert_eq!(ModelConfig::from_value(&config).unwrap().text.num_hidden_layers, 3);
    }

    #[test]
    fn qwen3_vl_interleaves_the_rotary_rows() {
        let config = json!({
            "model_type": "qwen3_vl",
            "text_config": {"hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 12, "vocab_size": 100,
                "rope_parameters": {"mrope_section": [2, 2, 2], "rope_theta": 5000000.0}},
            "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
                "num_position_embeddings": 16, "deepstack_visual_indexes": [1], "patch_size": 16}
        });
        let config = ModelConfig::from_value(&config).unwrap();
        assert_eq!(config.text.mrope_layout, MropeLayout::Interleaved);
        assert_eq!(config.text.frequency_rows(), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(config.vision.deepstack_layers(), 1);
        assert_eq!(config.vision.patches().patch_len(), 3 * 2 * 16 * 16);
    }
}
