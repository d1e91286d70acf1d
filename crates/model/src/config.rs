//! The checkpoint's JSON configuration files: `config.json` (flat as published, or with the
//! language part nested under `text_config` as transformers 5 writes it),
//! `generation_config.json` and `preprocessor_config.json`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Token ids the model and the prompt builder agree on; read from `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenIds {
    pub image: u32,
    pub video: u32,
    pub vision_start: u32,
    pub vision_end: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// How the rotary frequencies are split between the temporal, height and width rows.
    pub mrope_section: [usize; 3],
    pub tie_word_embeddings: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Width of the merger's output, which must equal the language model's hidden size.
    pub hidden_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_merge_size")]
    pub spatial_merge_size: usize,
    #[serde(default = "default_temporal_patch_size")]
    pub temporal_patch_size: usize,
    #[serde(default = "default_in_chans", alias = "in_channels")]
    pub in_chans: usize,
    /// Base of the 2D rotary frequencies (`rope_parameters.rope_theta` in transformers 5).
    #[serde(default = "default_vision_rope_theta")]
    pub rope_theta: f64,
}

fn default_vision_rope_theta() -> f64 {
    10_000.0
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_patch_size() -> usize {
    14
}
fn default_merge_size() -> usize {
    2
}
fn default_temporal_patch_size() -> usize {
    2
}
fn default_in_chans() -> usize {
    3
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }
    /// Values in one flattened patch: channels x frames x patch x patch.
    pub fn patch_len(&self) -> usize {
        self.in_chans * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub tokens: TokenIds,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        Self::from_value(&value).map_err(|reason| Error::config("config.json", reason))
    }

    pub fn from_value(root: &Value) -> std::result::Result<Self, String> {
        // transformers 5 nests the language part under `text_config`; older files keep it flat.
        // Look in `text_config` first, then at the top level, for every language-model key.
        let text_node = root.get("text_config").filter(|v| v.is_object());
        let get = |key: &str| -> Option<&Value> {
            text_node.and_then(|t| t.get(key)).filter(|v| !v.is_null()).or_else(|| root.get(key).filter(|v| !v.is_null()))
        };
        let usize_of = |key: &str| -> std::result::Result<usize, String> {
            get(key).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| format!("missing or non-integer `{key}`"))
        };
        let f64_or = |key: &str, default: f64| get(key).and_then(Value::as_f64).unwrap_or(default);

        let hidden_size = usize_of("hidden_size")?;
        let num_attention_heads = usize_of("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(format!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"));
        }
        let num_key_value_heads = get("num_key_value_heads").and_then(Value::as_u64).map(|v| v as usize).unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            ));
        }
        let head_dim = hidden_size / num_attention_heads;

        // `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5) carry the sections.
        let rope = get("rope_scaling").or_else(|| get("rope_parameters"));
        let sections: Vec<usize> = rope
            .and_then(|r| r.get("mrope_section"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).map(|v| v as usize).collect())
            .ok_or("missing `rope_scaling.mrope_section`")?;
        let mrope_section: [usize; 3] =
            sections.as_slice().try_into().map_err(|_| format!("mrope_section must have three entries, got {sections:?}"))?;
        if mrope_section.iter().sum::<usize>() * 2 != head_dim {
            return Err(format!("mrope_section {mrope_section:?} does not cover head_dim {head_dim} / 2"));
        }
        let rope_theta =
            rope.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64).unwrap_or_else(|| f64_or("rope_theta", 1_000_000.0));

        let text = TextConfig {
            vocab_size: usize_of("vocab_size")?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_hidden_layers: usize_of("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f64_or("rms_norm_eps", 1e-6),
            rope_theta,
            mrope_section,
            tie_word_embeddings: get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        };

        let vision_node = root.get("vision_config").ok_or("missing `vision_config`")?;
        let mut vision: VisionConfig = serde_json::from_value(vision_node.clone()).map_err(|e| format!("vision_config: {e}"))?;
        if let Some(theta) = vision_node.pointer("/rope_parameters/rope_theta").and_then(Value::as_f64) {
            vision.rope_theta = theta;
        }
        if vision.num_heads == 0 || !vision.embed_dim.is_multiple_of(vision.num_heads) || !vision.head_dim().is_multiple_of(4) {
            return Err("vision_config: embed_dim / num_heads must be a multiple of 4".into());
        }
        if vision.hidden_size != text.hidden_size {
            return Err(format!("vision_config.hidden_size {} differs from the text hidden_size {}", vision.hidden_size, text.hidden_size));
        }

        let token = |key: &str, default: u32| get(key).and_then(Value::as_u64).map(|v| v as u32).unwrap_or(default);
        let tokens = TokenIds {
            image: token("image_token_id", 151655),
            video: token("video_token_id", 151656),
            vision_start: token("vision_start_token_id", 151652),
            vision_end: token("vision_end_token_id", 151653),
        };
        Ok(Self { text, vision, tokens })
    }
}

/// Generation defaults the checkpoint ships (`generation_config.json`); all optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        Ok(Self::from_value(&value))
    }

    pub fn from_value(v: &Value) -> Self {
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|id| id as u32).collect(),
            _ => Vec::new(),
        };
        Self {
            eos_token_ids,
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: v.get("temperature").and_then(Value::as_f64),
            top_k: v.get("top_k").and_then(Value::as_u64).map(|k| k as usize),
            top_p: v.get("top_p").and_then(Value::as_f64),
            repetition_penalty: v.get("repetition_penalty").and_then(Value::as_f64),
            max_new_tokens: v.get("max_new_tokens").and_then(Value::as_u64).map(|n| n as usize),
        }
    }
}

/// Image preprocessing settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

/// The processor's published bounds; `max_pixels` is capped by the server separately.
pub const DEFAULT_MIN_PIXELS: u64 = 56 * 56;
pub const DEFAULT_MAX_PIXELS: u64 = 28 * 28 * 16384;
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
// The published decimals, parsed to the nearest f32 exactly as numpy does.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

impl Default for PreprocessorConfig {
    fn default() -> Self {
        Self {
            min_pixels: DEFAULT_MIN_PIXELS,
            max_pixels: DEFAULT_MAX_PIXELS,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }
}

impl PreprocessorConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        Self::from_value(&value).map_err(|reason| Error::config("preprocessor_config.json", reason))
    }

    pub fn from_value(v: &Value) -> std::result::Result<Self, String> {
        let d = Self::default();
        let u = |v: Option<&Value>| v.and_then(Value::as_u64);
        let size = v.get("size");
        // Both key forms exist in the wild: top-level min/max_pixels, or size.shortest/longest_edge.
        let min_pixels = u(v.get("min_pixels")).or_else(|| u(size.and_then(|s| s.get("shortest_edge")))).unwrap_or(d.min_pixels);
        let max_pixels = u(v.get("max_pixels")).or_else(|| u(size.and_then(|s| s.get("longest_edge")))).unwrap_or(d.max_pixels);
        if min_pixels > max_pixels {
            return Err(format!("min_pixels {min_pixels} exceeds max_pixels {max_pixels}"));
        }
        let triple = |key: &str, default: [f32; 3]| -> std::result::Result<[f32; 3], String> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x.as_f64().ok_or(format!("`{key}` must hold numbers"))? as f32;
                    }
                    Ok(out)
                }
                Some(_) => Err(format!("`{key}` must be a list of three numbers")),
            }
        };
        Ok(Self {
            min_pixels,
            max_pixels,
            patch_size: u(v.get("patch_size")).map(|x| x as usize).unwrap_or(d.patch_size),
            merge_size: u(v.get("merge_size")).map(|x| x as usize).unwrap_or(d.merge_size),
            temporal_patch_size: u(v.get("temporal_patch_size")).map(|x| x as usize).unwrap_or(d.temporal_patch_size),
            image_mean: triple("image_mean", d.image_mean)?,
            image_std: triple("image_std", d.image_std)?,
        })
    }

    /// Side of the square that one merged visual token covers in the resized image.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    serde_json::from_str(&text).map_err(|e| Error::config(name, e))
}
