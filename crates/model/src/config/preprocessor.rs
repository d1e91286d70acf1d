//! Image preprocessing settings (`preprocessor_config.json`): the resize bounds (as
//! `min_pixels`/`max_pixels`, or `size.shortest_edge`/`size.longest_edge`), patch and merge
//! sizes and the normalisation. What a file leaves out falls back to the family's own values.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{from_value, read_json};
use crate::error::{Error, Result};
use crate::families::Family;

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

/// The Qwen2-VL processor's published bounds; `max_pixels` is capped by the server separately.
pub const DEFAULT_MIN_PIXELS: u64 = 56 * 56;
pub const DEFAULT_MAX_PIXELS: u64 = 28 * 28 * 16384;
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
// The published decimals, parsed to the nearest f32 exactly as numpy does.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

impl Default for PreprocessorConfig {
    /// Qwen2-VL's and Qwen2.5-VL's processor.
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

#[derive(Deserialize)]
struct Size {
    #[serde(default)]
    shortest_edge: Option<u64>,
    #[serde(default)]
    longest_edge: Option<u64>,
}

#[derive(Deserialize)]
struct RawPreprocessorConfig {
    #[serde(default)]
    min_pixels: Option<u64>,
    #[serde(default)]
    max_pixels: Option<u64>,
    #[serde(default)]
    size: Option<Size>,
    #[serde(default)]
    patch_size: Option<usize>,
    #[serde(default)]
    merge_size: Option<usize>,
    #[serde(default)]
    temporal_patch_size: Option<usize>,
    #[serde(default)]
    image_mean: Option<[f32; 3]>,
    #[serde(default)]
    image_std: Option<[f32; 3]>,
}

impl PreprocessorConfig {
    /// The processor of a checkpoint of `family`: its `preprocessor_config.json` if it has one,
    /// with the family's values for what the file leaves out.
    pub fn for_family(family: Family, file: Option<&Path>) -> Result<Self> {
        let defaults = family.default_preprocessor();
        match file {
            Some(path) => Self::from_file(path, &defaults),
            None => Ok(defaults),
        }
    }

    /// `defaults` are the family's values for what the file leaves out.
    pub fn from_file(path: &Path, defaults: &Self) -> Result<Self> {
        Self::from_value(&read_json(path)?, defaults).map_err(|reason| Error::config("preprocessor_config.json", reason))
    }

    pub fn from_value(v: &Value, defaults: &Self) -> std::result::Result<Self, String> {
        let raw: RawPreprocessorConfig = from_value(v.clone())?;
        let size = raw.size.as_ref();
        // Both key forms exist in the wild: top-level min/max_pixels, or size.shortest/longest_edge.
        let config = Self {
            min_pixels: raw.min_pixels.or(size.and_then(|s| s.shortest_edge)).unwrap_or(defaults.min_pixels),
            max_pixels: raw.max_pixels.or(size.and_then(|s| s.longest_edge)).unwrap_or(defaults.max_pixels),
            patch_size: raw.patch_size.unwrap_or(defaults.patch_size),
            merge_size: raw.merge_size.unwrap_or(defaults.merge_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(defaults.temporal_patch_size),
            image_mean: raw.image_mean.unwrap_or(defaults.image_mean),
            image_std: raw.image_std.unwrap_or(defaults.image_std),
        };
        if config.min_pixels > config.max_pixels {
            return Err(format!("min_pixels {} exceeds max_pixels {}", config.min_pixels, config.max_pixels));
        }
        if config.patch_size == 0 || config.merge_size == 0 || config.temporal_patch_size == 0 {
            return Err("patch_size, merge_size and temporal_patch_size must be positive".into());
        }
        if config.image_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err("image_std must hold positive numbers".into());
        }
        Ok(config)
    }

    /// Side of the square that one merged visual token covers in the resized image.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}
