//! Extraction profiles: what an adapter was fine-tuned with (its prompt, the schema of its
//! answers, its image size, its generation settings), so that a client posts only an image
//! and an `X-Adapter` header. The base model has one too, from the top-level settings.

use std::path::Path;
use std::sync::Arc;

use qwen_ocr_model::preprocess::image::MAX_RESIZED_PIXELS;
use qwen_ocr_model::schema::Constraint;
use qwen_ocr_scheduler::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::config::{AdapterConfig, ServerConfig};
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::pixel_budget::{self, PixelBounds};

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
        Ok(ProfileSpec { schema: adapter.schema_file.as_ref().map(|f| read_schema_file(&base.join(f))).transpose()?, ..adapter.settings() })
    }

    /// Checks the settings against their meaning and the server's limits, wherever a profile
    /// is loaded (start-up, `POST /v1/adapters`, first use): a bad value is the operator's
    /// mistake, reported when it is made and naming the adapter (`None`: the base model) and
    /// the field, not left to fail every request that uses it.
    pub fn check(&self, adapter: Option<&str>, config: &ServerConfig) -> ApiResult<()> {
        let invalid = |reason: String| ApiError::new(ErrorKind::InvalidProfile, format!("{}: {reason}", owner(adapter)));
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(invalid(format!("temperature must be a finite number >= 0, got {t}")));
            }
        }
        match self.max_tokens {
            Some(0) => return Err(invalid("max_tokens must be at least 1".into())),
            Some(n) if n > config.max_tokens_limit => {
                return Err(invalid(format!("max_tokens {n} is over the server's max_tokens_limit ({})", config.max_tokens_limit)))
            }
            _ => {}
        }
        // Unset bounds fall back to the server's, so the pair in force is what must hold.
        check_pixel_bounds(self.min_pixels.or(config.min_pixels), self.max_pixels.or(config.max_pixels)).map_err(|e| invalid(e.to_string()))
    }

    /// Checks the settings (see [`ProfileSpec::check`]), now also against the checkpoint's
    /// resize range (a bound past this family's cap is refused, as a request's is, rather than
    /// capped unseen) and with the checkpoint's own bounds for what is unset; then compiles the
    /// schema, refusing one that cannot be enforced with its reason.
    pub fn compile(self, adapter: Option<&str>, config: &ServerConfig, engine: &Engine) -> ApiResult<ExtractionProfile> {
        self.check(adapter, config)?;
        let checkpoint = engine.preprocessor();
        let refused = |e: ApiError| ApiError::new(ErrorKind::InvalidProfile, format!("{}: {}", owner(adapter), e.message));
        let own = PixelBounds::new(self.min_pixels, self.max_pixels).checked(checkpoint.factor(), "").map_err(refused)?;
        let server = PixelBounds::new(config.min_pixels, config.max_pixels);
        pixel_budget::resolve(PixelBounds::default(), own, server, checkpoint, "").map_err(refused)?;
        let constraint = match &self.schema {
            Some(schema) => Some(Arc::new(engine.compile_schema(schema, self.strict).map_err(|e| {
                let e = ApiError::from(e);
                ApiError::new(e.kind, format!("{}: schema: {}", owner(adapter), e.message))
            })?)),
            None => None,
        };
        Ok(ExtractionProfile { settings: self, constraint })
    }
}

/// Who a profile belongs to, as its errors say it.
fn owner(adapter: Option<&str>) -> String {
    match adapter {
        Some(name) => format!("adapter `{name}`"),
        None => "the base model's profile".into(),
    }
}

/// `min_pixels`/`max_pixels` as a resize range: `max_pixels` at least 1 and at most
/// [`MAX_RESIZED_PIXELS`] (beyond it the bound would be silently capped), `min_pixels` not
/// above either. The error names the field.
pub fn check_pixel_bounds(min_pixels: Option<u64>, max_pixels: Option<u64>) -> anyhow::Result<()> {
    let cap = MAX_RESIZED_PIXELS;
    for (name, value) in [("min_pixels", min_pixels), ("max_pixels", max_pixels)] {
        if let Some(v) = value.filter(|&v| v > cap) {
            anyhow::bail!("{name} {v} is over {cap}, the most pixels a resized image may have (16384 visual tokens)");
        }
    }
    if max_pixels == Some(0) {
        anyhow::bail!("max_pixels must be at least 1");
    }
    if let (Some(min), Some(max)) = (min_pixels, max_pixels) {
        anyhow::ensure!(min <= max, "min_pixels {min} exceeds max_pixels {max}");
    }
    Ok(())
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
