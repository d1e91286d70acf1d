//! How the model is loaded (`dtype`, `quant`, `quant_cache`, `device`), as flags, environment
//! variables and the configuration file give it: parsed into these types where they are read,
//! so a typo is an error naming the option before anything loads, and a wrong value never
//! travels as a string to where it is finally used.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Result;
use candle_core::DType;
use clap::ValueEnum;
use qwen_ocr_model::kernels::q8;
use qwen_ocr_model::model::parse_device;
use qwen_ocr_model::{LoadOptions, Quant};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    #[value(alias = "float32", alias = "float")]
    #[serde(alias = "float32", alias = "float")]
    F32,
    #[value(alias = "bfloat16")]
    #[serde(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16", alias = "half")]
    #[serde(alias = "float16", alias = "half")]
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }
}

/// How the projections' weights are held; `auto` depends on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantMode {
    /// `q8_0` on a CPU with AVX2 or AVX-512 VNNI (our SIMD Q8_0 kernels: faster than f32 there
    /// and a third of its memory), `none` elsewhere (CUDA; CPUs left with the portable Q8_0
    /// loops, which are far slower than f32).
    #[default]
    Auto,
    /// The checkpoint's weights: token-exact with transformers in f32.
    None,
    /// 8-bit weights (GGML's Q8_0).
    #[value(name = "q8_0", alias = "q8")]
    #[serde(rename = "q8_0", alias = "q8")]
    Q8_0,
    /// GGML's 4-bit k-quant.
    #[value(name = "q4k", alias = "q4_k")]
    #[serde(rename = "q4k", alias = "q4_k")]
    Q4K,
}

impl QuantMode {
    /// The kind to load with on `device`.
    pub fn resolve(self, device: &candle_core::Device) -> Quant {
        match self {
            QuantMode::Auto if device.is_cpu() && q8::fast_on_this_cpu() => Quant::Q8_0,
            QuantMode::Auto | QuantMode::None => Quant::None,
            QuantMode::Q8_0 => Quant::Q8_0,
            QuantMode::Q4K => Quant::Q4K,
        }
    }
}

/// `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => lower
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: use cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Where quantized weights are kept between starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum QuantCache {
    /// `$XDG_CACHE_HOME/qwen-ocr/quantized`, else `~/.cache/qwen-ocr/quantized`.
    #[default]
    Auto,
    /// Quantize at every start.
    Off,
    Dir(PathBuf),
}

impl FromStr for QuantCache {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => QuantCache::Auto,
            "off" | "" => QuantCache::Off,
            dir => QuantCache::Dir(PathBuf::from(dir)),
        })
    }
}

impl fmt::Display for QuantCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantCache::Auto => f.write_str("auto"),
            QuantCache::Off => f.write_str("off"),
            QuantCache::Dir(dir) => write!(f, "{}", dir.display()),
        }
    }
}

impl QuantCache {
    fn dir(&self) -> Option<PathBuf> {
        match self {
            QuantCache::Auto => default_quant_cache(),
            QuantCache::Off => None,
            QuantCache::Dir(dir) => Some(dir.clone()),
        }
    }
}

/// `$XDG_CACHE_HOME/qwen-ocr/quantized`, else `~/.cache/qwen-ocr/quantized`.
fn default_quant_cache() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("qwen-ocr").join("quantized"))
}

/// The four settings together: `auto` quantization depends on the device, and some
/// combinations are refused (see [`LoadOptions::validate`]).
pub fn load_options(dtype: Precision, device: DeviceSpec, quant: QuantMode, quant_cache: &QuantCache) -> Result<LoadOptions> {
    // The model crate opens the device, with its checks that CUDA is built in and present.
    let device = parse_device(&device.to_string())?;
    let options = LoadOptions { dtype: dtype.dtype(), quant: quant.resolve(&device), device, quant_cache: quant_cache.dir() };
    options.validate()?;
    Ok(options)
}

/// Serde through the text form, as the configuration file writes these.
macro_rules! serde_as_text {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_as_text!(DeviceSpec, QuantCache);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_forms_round_trip_and_typos_are_refused() {
        for text in ["cpu", "cuda:0", "cuda:3"] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap().to_string(), text);
        }
        assert_eq!("CUDA".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert!("gpu".parse::<DeviceSpec>().unwrap_err().contains("gpu"));
        for text in ["auto", "off", "/cache/q"] {
            assert_eq!(text.parse::<QuantCache>().unwrap().to_string(), text);
        }
        #[derive(Deserialize)]
        struct Options {
            #[allow(dead_code)]
            dtype: Precision,
            quant: QuantMode,
        }
        let parsed: Options = toml::from_str("dtype = \"half\"\nquant = \"q8\"\n").unwrap();
        assert_eq!(parsed.quant, QuantMode::Q8_0);
        let err = toml::from_str::<Options>("dtype = \"f32\"\nquant = \"q5\"\n").err().unwrap().to_string();
        assert!(err.contains("quant") && err.contains("q5"), "{err}");
        assert_eq!(QuantMode::from_str("Q8_0", true), Ok(QuantMode::Q8_0));
    }

    #[test]
    fn auto_quantization_follows_the_device() {
        let fast_q8 = if q8::fast_on_this_cpu() { Quant::Q8_0 } else { Quant::None };
        assert_eq!(QuantMode::Auto.resolve(&candle_core::Device::Cpu), fast_q8);
        assert_eq!(QuantMode::None.resolve(&candle_core::Device::Cpu), Quant::None);
    }
}
