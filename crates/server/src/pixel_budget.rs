//! A request's visual budget: how many pixels an image may have once resized, which decides
//! how many visual tokens it costs (too few and small print is lost, too many and time is).
//! A request may choose (`min_pixels`/`max_pixels` on `/v1/extract`, `mm_processor_kwargs` or
//! per image on chat) within the resize caps; otherwise the adapter's profile decides, then the
//! server's configuration, then the checkpoint's `preprocessor_config.json`.

use qwen_ocr_model::config::PreprocessorConfig;
use qwen_ocr_model::preprocess::image::{max_resized_pixels, ImageOptions};

use crate::error::{ApiError, ApiResult, ErrorKind};

/// Bounds some source may set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PixelBounds {
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
}

/// The bounds an image is resized within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelBudget {
    pub min_pixels: u64,
    pub max_pixels: u64,
}

impl PixelBounds {
    pub fn new(min_pixels: Option<u64>, max_pixels: Option<u64>) -> Self {
        Self { min_pixels, max_pixels }
    }

    /// Each bound from `self` where set, else from `fallback`.
    pub fn or(self, fallback: Self) -> Self {
        Self { min_pixels: self.min_pixels.or(fallback.min_pixels), max_pixels: self.max_pixels.or(fallback.max_pixels) }
    }

    /// A request's bounds, each between one merged patch (`factor`²) and the checkpoint's resize
    /// cap; 400 naming the field (`prefix` + `min_pixels`) otherwise.
    pub fn checked(self, factor: usize, prefix: &str) -> ApiResult<Self> {
        let (lowest, highest) = ((factor * factor) as u64, max_resized_pixels(factor));
        for (name, value) in [("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)] {
            if let Some(v) = value.filter(|v| !(lowest..=highest).contains(v)) {
                return Err(ApiError::new(
                    ErrorKind::InvalidField,
                    format!("{prefix}{name} must be between {lowest} and {highest}, got {v}"),
                ));
            }
        }
        Ok(self)
    }
}

/// The budget of one image: the request's bounds over the profile's over the configuration's
/// over the checkpoint's, each bound on its own. A `min_pixels` above the `max_pixels` it meets
/// is refused naming both and where each came from.
pub fn resolve(
    request: PixelBounds,
    profile: PixelBounds,
    config: PixelBounds,
    checkpoint: &PreprocessorConfig,
    prefix: &str,
) -> ApiResult<PixelBudget> {
    let sources = [(request, "this request's"), (profile, "the adapter profile's"), (config, "the server's")];
    let pick = |bound: fn(&PixelBounds) -> Option<u64>, default: u64| {
        sources.iter().find_map(|(b, source)| bound(b).map(|v| (v, *source))).unwrap_or((default, "the checkpoint's"))
    };
    let (min_pixels, min_source) = pick(|b| b.min_pixels, checkpoint.min_pixels);
    let (max_pixels, max_source) = pick(|b| b.max_pixels, checkpoint.max_pixels);
    let max_pixels = max_pixels.min(max_resized_pixels(checkpoint.factor()));
    if min_pixels > max_pixels {
        return Err(ApiError::new(
            ErrorKind::InvalidField,
            format!("{prefix}min_pixels ({min_pixels}, {min_source}) exceeds {prefix}max_pixels ({max_pixels}, {max_source})"),
        ));
    }
    Ok(PixelBudget { min_pixels, max_pixels })
}

impl PixelBudget {
    pub fn image_options(self, max_decoded_pixels: u64) -> ImageOptions {
        ImageOptions { min_pixels: Some(self.min_pixels), max_pixels: Some(self.max_pixels), max_decoded_pixels: Some(max_decoded_pixels) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> PreprocessorConfig {
        PreprocessorConfig { min_pixels: 3136, max_pixels: 1 << 20, ..PreprocessorConfig::default() }
    }

    #[test]
    fn each_bound_comes_from_the_first_source_that_sets_it() {
        let none = PixelBounds::default();
        let budget = |request, profile, config| resolve(request, profile, config, &checkpoint(), "").unwrap();
        assert_eq!(budget(none, none, none), PixelBudget { min_pixels: 3136, max_pixels: 1 << 20 });
        let profile = PixelBounds::new(None, Some(262_144));
        let config = PixelBounds::new(Some(10_000), Some(500_000));
        assert_eq!(budget(none, profile, config), PixelBudget { min_pixels: 10_000, max_pixels: 262_144 });
        let request = PixelBounds::new(Some(50_000), None);
        assert_eq!(budget(request, profile, config), PixelBudget { min_pixels: 50_000, max_pixels: 262_144 });
    }

    #[test]
    fn a_minimum_over_the_maximum_it_meets_names_both_sources() {
        let err = resolve(
            PixelBounds::new(Some(400_000), None),
            PixelBounds::new(None, Some(262_144)),
            PixelBounds::default(),
            &checkpoint(),
            "",
        )
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidField);
        assert!(
            err.message.contains("min_pixels (400000, this request's)") && err.message.contains("(262144, the adapter profile's)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn request_bounds_stay_within_the_caps() {
        let cap = max_resized_pixels(28);
        assert!(PixelBounds::new(Some(784), Some(cap)).checked(28, "").is_ok());
        let err = PixelBounds::new(None, Some(783)).checked(28, "mm_processor_kwargs.").unwrap_err();
        assert!(err.message.starts_with("mm_processor_kwargs.max_pixels must be between 784 and"), "{}", err.message);
        let err = PixelBounds::new(Some(cap + 1), None).checked(28, "").unwrap_err();
        assert!(err.message.starts_with("min_pixels"), "{}", err.message);
    }
}
