//! Generation defaults the checkpoint ships (`generation_config.json`); all optional.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{from_value, read_json};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationConfig {
    #[serde(rename = "eos_token_id", default, deserialize_with = "one_or_many")]
    pub eos_token_ids: Vec<u32>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

/// `eos_token_id` is a number or a list of numbers.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(id)) => vec![id],
        Some(OneOrMany::Many(ids)) => ids,
    })
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(&read_json(path)?).map_err(|reason| Error::config("generation_config.json", reason))
    }

    pub fn from_value(v: &Value) -> std::result::Result<Self, String> {
        let config: Self = from_value(v.clone())?;
        if config.repetition_penalty.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
            return Err("repetition_penalty must be a positive number".into());
        }
        if config.temperature.is_some_and(|t| !(t.is_finite() && t >= 0.0)) {
            return Err("temperature must be a finite, non-negative number".into());
        }
        Ok(config)
    }
}
