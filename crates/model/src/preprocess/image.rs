//! Image preprocessing, exactly as transformers' `Qwen2VLImageProcessor` with the PIL backend
//! (which every family uses, with its own patch size and normalisation):
//! decode (size checked before the pixels are decoded), EXIF orientation, RGB as PIL's
//! `convert("RGB")` (alpha dropped), `smart_resize`, PIL's 8-bit bicubic resampling, rescale, normalise,
//! temporal duplication and the merge-group patch order.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::config::PreprocessorConfig;
use crate::error::{ImageError, Result};

/// Default cap on the pixels an image may declare before we refuse to decode it.
pub const DEFAULT_MAX_DECODED_PIXELS: u64 = 64 * 1024 * 1024;

/// The most visual tokens an image may become: what the processors publish as their largest
/// (`28 * 28 * 16384` pixels for Qwen2-VL, `32 * 32 * 16384` for Qwen3-VL). `max_pixels` is
/// capped there and `min_pixels` may not pass it: `pixel_values` take 24 bytes a resized pixel,
/// so unbounded bounds would allocate without limit.
pub const MAX_VISUAL_TOKENS: u64 = 16384;

/// The largest `max_pixels` any supported processor can take (Qwen3-VL's 32-pixel tokens):
/// the bound settings are checked against before the checkpoint is known.
pub const MAX_RESIZED_PIXELS: u64 = 32 * 32 * MAX_VISUAL_TOKENS;

/// The cap on `max_pixels` for merged tokens of `factor` x `factor` pixels.
pub fn max_resized_pixels(factor: usize) -> u64 {
    (factor * factor) as u64 * MAX_VISUAL_TOKENS
}

/// What the vision tower consumes for one image.
#[derive(Debug, Clone)]
pub struct PreprocessedImage {
    /// Row-major `[patches, channels * temporal * patch * patch]`.
    pub pixel_values: Vec<f32>,
    /// `(t, h, w)` in patches.
    pub grid_thw: [usize; 3],
    /// `(height, width)` in pixels after `smart_resize`.
    pub resized: [usize; 2],
}

impl PreprocessedImage {
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }
    /// Number of `<|image_pad|>` tokens (and of merged visual embeddings) this image takes.
    pub fn visual_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size)
    }
    pub fn patch_len(&self) -> usize {
        self.pixel_values.len() / self.num_patches().max(1)
    }
}

/// Per-call preprocessing options; `None` falls back to the checkpoint's values.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImageOptions {
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Refuse images whose header declares more pixels than this (decided before decoding).
    pub max_decoded_pixels: Option<u64>,
}

/// Decodes an encoded image (PNG, JPEG, WebP, GIF, BMP, TIFF) into upright RGB.
pub fn decode_rgb(bytes: &[u8], max_decoded_pixels: u64) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::UnsupportedFormat.into());
    }
    if reader.format() == Some(image::ImageFormat::Png) {
        check_png_palette(bytes)?;
    }
    let mut decoder = reader.into_decoder().map_err(classify)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ImageError::Empty.into());
    }
    let pixels = width as u64 * height as u64;
    if pixels > max_decoded_pixels {
        return Err(ImageError::TooLarge { width, height, pixels, limit: max_decoded_pixels }.into());
    }
    // A broken EXIF block is not worth refusing the image for: PIL ignores it too.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(classify)?;
    img.apply_orientation(orientation);
    let mut rgb = to_rgb(img);
    if let Some(key) = crate::preprocess::color_key::png_color_key(bytes) {
        rgb.pixels_mut().filter(|p| p.0 == key).for_each(|p| p.0 = [255; 3]);
    }
    Ok(rgb)
}

/// png 0.18.1 panics expanding a palette that ends in a partial entry (PLTE not a multiple of
/// 3 bytes, which the format forbids); found by the `image_preprocess` fuzz target.
fn check_png_palette(bytes: &[u8]) -> Result<()> {
    let Ok(reader) = png::Decoder::new(Cursor::new(bytes)).read_info() else { return Ok(()) };
    match reader.info().palette.as_deref() {
        Some(palette) if palette.len() % 3 != 0 => {
            Err(ImageError::Corrupt(format!("the PLTE chunk has {} bytes, not whole RGB entries", palette.len())).into())
        }
        _ => Ok(()),
    }
}

fn classify(e: image::ImageError) -> crate::error::Error {
    match e {
        image::ImageError::Unsupported(_) => ImageError::UnsupportedFormat.into(),
        other => ImageError::Corrupt(other.to_string()).into(),
    }
}

/// RGB as PIL's `convert("RGB")`: alpha is dropped, not composited (RGBA, LA, palettes; for
/// a single transparent colour see [`crate::preprocess::color_key`]). `transformers.image_utils.load_image` and LLaMA-Factory's
/// training both convert this way, so this is what fine-tuned adapters saw.
fn to_rgb(img: DynamicImage) -> RgbImage {
    img.into_rgb8()
}

/// The processor's `smart_resize`: both sides become multiples of `factor`, rounded with
/// Python's half-to-even `round`, then scaled into `[min_pixels, max_pixels]`; `max_pixels`
/// is capped at [`max_resized_pixels`], and bounds that cannot hold are refused.
pub fn smart_resize(height: usize, width: usize, factor: usize, min_pixels: u64, max_pixels: u64) -> Result<(usize, usize)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if height == 0 || width == 0 {
        return Err(ImageError::Empty.into());
    }
    let bounds = |reason| ImageError::PixelBounds { min_pixels, max_pixels, reason };
    if min_pixels > max_pixels {
        return Err(bounds("min_pixels exceeds max_pixels").into());
    }
    let cap = max_resized_pixels(factor);
    if min_pixels > cap {
        return Err(bounds("min_pixels exceeds the most pixels a resized image may have (16384 visual tokens)").into());
    }
    let max_pixels = max_pixels.min(cap);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(ImageError::AspectRatio { width: width as u32, height: height as u32, ratio }.into());
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Decodes and preprocesses one image for the vision tower.
pub fn preprocess(bytes: &[u8], config: &PreprocessorConfig, options: &ImageOptions) -> Result<PreprocessedImage> {
    let rgb = decode_rgb(bytes, options.max_decoded_pixels.unwrap_or(DEFAULT_MAX_DECODED_PIXELS))?;
    preprocess_rgb(&rgb, config, options)
}

pub fn preprocess_rgb(rgb: &RgbImage, config: &PreprocessorConfig, options: &ImageOptions) -> Result<PreprocessedImage> {
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    let min_pixels = options.min_pixels.unwrap_or(config.min_pixels);
    let max_pixels = options.max_pixels.unwrap_or(config.max_pixels);
    let (rh, rw) = smart_resize(height, width, config.factor(), min_pixels, max_pixels)?;
    let resized = resize_bicubic(rgb, rw, rh);
    Ok(patchify(&resized, config, rh, rw))
}

/// Rescales, normalises and cuts the image into flattened patches, ordered so that each
/// `merge x merge` group of patches is contiguous (the order the merger expects).
fn patchify(img: &RgbImage, config: &PreprocessorConfig, height: usize, width: usize) -> PreprocessedImage {
    let p = config.patch_size;
    let m = config.merge_size;
    let tp = config.temporal_patch_size;
    let (gh, gw) = (height / p, width / p);
    // transformers rescales in f64, stores f32, then normalises in f32.
    let rescale = 1.0f64 / 255.0;
    let lut: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|v| ((v as f64 * rescale) as f32 - config.image_mean[c]) / config.image_std[c]));
    let patch_len = 3 * tp * p * p;
    let mut out = Vec::with_capacity(gh * gw * patch_len);
    let raw = img.as_raw();
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (row0, col0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for (c, table) in lut.iter().enumerate() {
                        // A still image is repeated to fill the temporal patch.
                        for _ in 0..tp {
                            for y in 0..p {
                                let base = ((row0 + y) * width + col0) * 3 + c;
                                out.extend((0..p).map(|x| table[raw[base + x * 3] as usize]));
                            }
                        }
                    }
                }
            }
        }
    }
    PreprocessedImage { pixel_values: out, grid_thw: [1, gh, gw], resized: [height, width] }
}

// ---- PIL's bicubic resampling (Pillow `Resample.c`, 8 bits per channel) ----

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps for one axis: for each output index, the first input index and
/// its weights. Antialiased when shrinking: the support widens by the scale factor.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C truncates toward zero when converting to int, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) / filterscale)).collect();
        let total: f64 = w.iter().sum();
        let fixed = w
            .iter()
            .map(|&k| {
                let k = if total != 0.0 { k / total } else { k };
                let scaled = k * (1u32 << PRECISION_BITS) as f64;
                (if scaled < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
            })
            .collect();
        start.push(xmin);
        weights.push(fixed);
    }
    Taps { start, weights }
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `Image.resize((width, height), Image.BICUBIC)` for an RGB image: two separable passes, each
/// rounding to 8 bits as Pillow does. Same size is a copy. Pillow (since 12) runs the vertical
/// pass first when the height shrinks by more than twice what the width does; the order changes
/// the rounding, so we follow it.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let shrink_h = in_h as i64 - out_h as i64;
    let shrink_w = in_w as i64 - out_w as i64;
    let vertical_first = shrink_h > 0 && shrink_h > shrink_w * 2;
    let mut buf = img.as_raw().clone();
    let (mut w, mut h) = (in_w, in_h);
    let horizontal = |buf: &mut Vec<u8>, w: &mut usize, h: usize| {
        if out_w != *w {
            *buf = resample_rows(buf, *w, h, out_w);
            *w = out_w;
        }
    };
    let vertical = |buf: &mut Vec<u8>, w: usize, h: &mut usize| {
        if out_h != *h {
            *buf = resample_columns(buf, w, *h, out_h);
            *h = out_h;
        }
    };
    if vertical_first {
        vertical(&mut buf, w, &mut h);
        horizontal(&mut buf, &mut w, h);
    } else {
        horizontal(&mut buf, &mut w, h);
        vertical(&mut buf, w, &mut h);
    }
    RgbImage::from_raw(w as u32, h as u32, buf).expect("buffer sized for the output image")
}

/// Horizontal pass: `w` -> `out_w` columns over `h` rows of RGB.
fn resample_rows(src: &[u8], w: usize, h: usize, out_w: usize) -> Vec<u8> {
    let t = taps(w, out_w);
    let mut out = vec![0u8; out_w * h * 3];
    for y in 0..h {
        let row = &src[y * w * 3..(y + 1) * w * 3];
        for x in 0..out_w {
            for c in 0..3 {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (i, &k) in t.weights[x].iter().enumerate() {
                    acc += row[(t.start[x] + i) * 3 + c] as i32 * k;
                }
                out[(y * out_w + x) * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

/// Vertical pass: `h` -> `out_h` rows of `w` RGB pixels.
fn resample_columns(src: &[u8], w: usize, h: usize, out_h: usize) -> Vec<u8> {
    let t = taps(h, out_h);
    let stride = w * 3;
    let mut out = vec![0u8; out_h * stride];
    for y in 0..out_h {
        for v in 0..stride {
            let mut acc: i32 = 1 << (PRECISION_BITS - 1);
            for (i, &k) in t.weights[y].iter().enumerate() {
                acc += src[(t.start[y] + i) * stride + v] as i32 * k;
            }
            out[y * stride + v] = clip8(acc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_half_to_even() {
        // 70 / 28 = 2.5 rounds to 2, as Python's round does; 126 / 28 = 4.5 rounds to 4.
        assert_eq!(smart_resize(126, 70, 28, 56 * 56, 28 * 28 * 1280).unwrap(), (112, 56));
    }

    #[test]
    fn smart_resize_respects_bounds() {
        let (h, w) = smart_resize(4000, 3000, 28, 3136, 28 * 28 * 256).unwrap();
        assert!(h * w <= 28 * 28 * 256 && h % 28 == 0 && w % 28 == 0);
        let (h, w) = smart_resize(10, 10, 28, 3136, 1 << 30).unwrap();
        assert!(h * w >= 3136);
    }

    /// Found by the `image_preprocess` fuzz target: `min_pixels` 2^56 (a profile or the
    /// configuration may set any u64) upscaled a 3x2 image to ~2^28 pixels a side and the resampler
    /// asked for gigabytes.
    #[test]
    fn unbounded_min_pixels_is_refused_not_allocated() {
        let img = RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3]));
        let config = PreprocessorConfig::default();
        for (min, max) in [(1 << 56, None), (1 << 40, Some(u64::MAX)), (1 << 20, Some(1 << 10))] {
            let options = ImageOptions { min_pixels: Some(min), max_pixels: max, max_decoded_pixels: None };
            let err = preprocess_rgb(&img, &config, &options).unwrap_err();
            assert!(matches!(err, crate::Error::Image(ImageError::PixelBounds { .. })), "{min} {max:?}: {err}");
        }
    }

    #[test]
    fn a_palette_with_a_partial_entry_is_corrupt_not_a_panic() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/fuzz/palette-partial-entry.png")).unwrap();
        let err = decode_rgb(&bytes, DEFAULT_MAX_DECODED_PIXELS).unwrap_err();
        assert!(matches!(err, crate::Error::Image(ImageError::Corrupt(ref why)) if why.contains("PLTE")), "{err}");
    }

    #[test]
    fn max_pixels_is_capped() {
        let (h, w) = smart_resize(8000, 8000, 28, 3136, u64::MAX).unwrap();
        assert!((h * w) as u64 <= max_resized_pixels(28) && h % 28 == 0 && w % 28 == 0, "{h}x{w}");
        let (h, w) = smart_resize(10, 10, 28, max_resized_pixels(28), u64::MAX).unwrap();
        assert!((h * w) as u64 >= max_resized_pixels(28), "{h}x{w}");
    }

    #[test]
    fn extreme_aspect_ratio_is_refused() {
        assert!(smart_resize(10, 2100, 28, 3136, 1 << 30).is_err());
    }

    #[test]
    fn alpha_is_dropped_not_composited() {
        let rgba = image::RgbaImage::from_fn(3, 1, |x, _| image::Rgba([10, 20, 30, [0, 128, 255][x as usize]]));
        let rgb = to_rgb(DynamicImage::ImageRgba8(rgba));
        assert!(rgb.pixels().all(|p| p.0 == [10, 20, 30]), "{rgb:?}");
    }

    #[test]
    fn resize_to_same_size_is_identity() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        assert_eq!(resize_bicubic(&img, 5, 4), img);
    }
}
