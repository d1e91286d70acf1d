//! Extraction profiles: what an adapter was fine-tuned with (its prompt, the schema of its
//! answers, its image size, its generation settings), so that a client posts only an image
//! and an `X-Adapter` header. The base model has one too, from the top-level settings.

use std::path::Path;
use std::sync::Arc;

use qwen_ocr_model::schema::Constraint;
use qwen_ocr_model::Pipeline;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::config::AdapterConfig;
use crate::error::{ApiError, ApiResult, ErrorKind};

/// A profile ready for use: its settings and its schema's compiled constraint.
#[derive(Debug, Clone, Default)]
pub struct ExtractionProfile {
    pub settings: ProfileSpec,
    pub constraint: Option<Arc<Constraint>>,
}

/// A profile's settings, as configured or posted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ProfileSpec {
    /// The prompt the adapter was trained on; `None`: the server's `extraction_prompt`.
    pub prompt: Option<String>,
    /// The JSON Schema every answer must validate against.
    pub schema: Option<Value>,
    /// Refuse a schema with keywords the grammar cannot enforce, instead of relaxing them and
    /// checking answers after decoding.
    #[serde(default)]
    pub strict: bool,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    /// The resize bounds the adapter's images were trained at (LLaMA-Factory's
    /// `image_max_pixels`); `None`: the server's.
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
}

impl ProfileSpec {
    /// The profile an adapter's configuration describes (a `[adapters.NAME]` table, or the
    /// `qwen-ocr.toml` in its folder); a relative `schema_file` resolves against `base`.
    pub fn from_config(adapter: &AdapterConfig, base: &Path) -> ApiResult<Self> {
        Ok(ProfileSpec {
            prompt: adapter.prompt.clone(),
            schema: adapter.schema_file.as_ref().map(|f| read_schema_file(&base.join(f))).transpose()?,
            strict: adapter.strict,
            max_tokens: adapter.max_tokens,
            temperature: adapter.temperature,
            min_pixels: adapter.min_pixels,
            max_pixels: adapter.max_pixels,
        })
    }

    /// Checks the settings and compiles the schema; a schema that cannot be used (or, when
    /// strict, cannot be enforced) is refused with its reason.
    pub fn compile(self, pipeline: &Pipeline) -> ApiResult<ExtractionProfile> {
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(ApiError::new(ErrorKind::InvalidProfile, format!("temperature must be a finite number >= 0, got {t}")));
            }
        }
        if self.max_tokens == Some(0) {
            return Err(ApiError::new(ErrorKind::InvalidProfile, "max_tokens must be at least 1"));
        }
        let constraint = match &self.schema {
            Some(schema) => Some(Arc::new(pipeline.vocabulary()?.constrain(schema, self.strict)?)),
            None => None,
        };
        Ok(ExtractionProfile { settings: self, constraint })
    }
}

/// Reads a schema file; a file that is not JSON is refused with where and why.
pub fn read_schema_file(path: &Path) -> ApiResult<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ApiError::new(ErrorKind::InvalidSchema, format!("cannot read schema file {}: {e}", path.display())))?;
    parse_schema(&text).map_err(|e| ApiError::new(ErrorKind::InvalidSchema, format!("{}: {}", path.display(), e.message)))
}

/// A schema sent as JSON text (a form field or a query parameter).
pub fn parse_schema(text: &str) -> ApiResult<Value> {
    serde_json::from_str(text).map_err(|e| ApiError::new(ErrorKind::InvalidSchema, format!("invalid JSON schema: not JSON: {e}")))
}
