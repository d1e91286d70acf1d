//! `GET /v1/models`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ObjectKind;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub object: ObjectKind,
    /// `base` first, then the loaded adapters, then those the adapters folder would load.
    pub data: Vec<Model>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Model {
    /// What `model` (or `X-Adapter`) takes: `base`, or an adapter's name.
    pub id: String,
    pub object: ObjectKind,
    /// Always 0.
    pub created: u64,
    pub owned_by: String,
    /// The served checkpoint.
    pub root: String,
    /// The checkpoint's architecture (`config.json`'s `model_type`: `qwen2_vl`, `qwen2_5_vl`,
    /// `qwen3_vl`); absent while the model is still loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// `base`, for adapters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// False for an adapter of the adapters folder not yet loaded (its first request loads it).
    pub loaded: bool,
}
