//! `/v1/adapters`: list, load (or atomically replace), unload.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::ObjectKind;
use qwen_ocr_model::adapters::lora::ModuleKind;

use crate::profile::ProfileSpec;

/// How many of the model's projections the adapter changes, by part (`language`, `vision`,
/// `merger`): an `Adapter`'s and a `LoadedAdapter`'s `modules`.
pub fn modules(matched: &BTreeMap<ModuleKind, usize>) -> BTreeMap<String, usize> {
    matched
        .iter()
        .map(|(kind, &n)| (serde_json::to_value(kind).ok().and_then(|k| k.as_str().map(str::to_string)).unwrap_or_default(), n))
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadAdapterRequest {
    /// 1-64 of `[A-Za-z0-9._-]`, not `base`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$", min_length = 1, max_length = 64)]
    pub name: String,
    /// Relative to `--adapters-dir` (or absolute, but inside it).
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// The extraction profile, as in the configuration file: the prompt the adapter was
    /// trained on (default: the server's `extraction_prompt`).
    pub prompt: Option<String>,
    /// The JSON Schema every answer must validate against.
    pub schema: Option<Value>,
    /// Or the schema in a file inside `--adapters-dir`; not both.
    #[schema(value_type = Option<String>)]
    pub schema_file: Option<PathBuf>,
    /// Refuse a schema with keywords the grammar cannot enforce while decoding; default: leave
    /// them out of the grammar and check every answer against the full schema afterwards.
    #[serde(default)]
    pub strict: bool,
    #[schema(minimum = 1)]
    pub max_tokens: Option<usize>,
    #[schema(minimum = 0.0)]
    pub temperature: Option<f64>,
    /// The resize bounds the adapter's images were trained at; default: the server's.
    /// `min_pixels` may not exceed `max_pixels`; both are at most the document's maximum.
    pub min_pixels: Option<u64>,
    #[schema(minimum = 1)]
    pub max_pixels: Option<u64>,
}

impl LoadAdapterRequest {
    /// The profile's settings, without its schema (inline or in a file, resolved by the route).
    pub fn settings(&self) -> ProfileSpec {
        ProfileSpec {
            prompt: self.prompt.clone(),
            schema: None,
            strict: self.strict,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterList {
    pub object: ObjectKind,
    pub data: Vec<Adapter>,
    /// Memory the loaded adapters hold.
    pub resident_bytes: usize,
}

/// A loaded adapter and its extraction profile's settings, side by side.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Adapter {
    pub name: String,
    pub modules: BTreeMap<String, usize>,
    pub bytes: usize,
    #[serde(flatten)]
    pub profile: ProfileSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LoadedAdapter {
    pub name: String,
    pub modules: BTreeMap<String, usize>,
    pub bytes: usize,
    /// Whether an adapter of that name was replaced (200) rather than added (201).
    pub replaced: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UnloadedAdapter {
    pub name: String,
    pub deleted: bool,
}
