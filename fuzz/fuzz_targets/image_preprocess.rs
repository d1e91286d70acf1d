//! Image decoding and preprocessing as the server runs them on an upload: decode within the
//! server's default pixel limit, EXIF orientation, RGB and colour key, `smart_resize`, bicubic
//! resampling, patchify. Must end in `Ok` or a typed error, within libFuzzer's memory limit.
//!
//! Input: one byte choosing `min_pixels`, one choosing `max_pixels`, then the encoded image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qwen_ocr_model::config::PreprocessorConfig;
use qwen_ocr_model::preprocess::image::{preprocess, ImageOptions, DEFAULT_MAX_DECODED_PIXELS};

/// 0: the checkpoint's bound; else a power of two up to 2^63, since the configuration and
/// adapter profiles accept any u64 there.
fn bound(byte: u8) -> Option<u64> {
    (byte != 0).then(|| 1u64 << (byte % 64))
}

fuzz_target!(|data: &[u8]| {
    let [min, max, image @ ..] = data else { return };
    let config = PreprocessorConfig::default();
    let options = ImageOptions { min_pixels: bound(*min), max_pixels: bound(*max), max_decoded_pixels: Some(DEFAULT_MAX_DECODED_PIXELS) };
    let Ok(out) = preprocess(image, &config, &options) else { return };
    // What the vision tower relies on: whole merge groups, and one patch per grid cell.
    let (p, m) = (config.patch_size, config.merge_size);
    let [t, h, w] = out.grid_thw;
    assert_eq!((t, h % m, w % m), (1, 0, 0), "grid {:?}", out.grid_thw);
    assert_eq!(out.resized, [h * p, w * p]);
    assert_eq!(out.pixel_values.len(), out.num_patches() * 3 * config.temporal_patch_size * p * p);
});
