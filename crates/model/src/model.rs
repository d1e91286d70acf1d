//! The loaded model, whatever its family: that family's vision tower and the shared decoder from
//! one checkpoint, plus the glue that splices image embeddings into the prompt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::adapters::lora::LoraAdapter;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::families::{Family, VisionTower, VisualEmbeds};
use crate::layers::decoder::{Deepstack, SeqInput, TextModel};
use crate::layers::linear::Linear;
use crate::layers::quant::Quant;
use crate::loading::checkpoint::CheckpointFiles;
use crate::loading::quant_cache::QuantCache;
use crate::loading::weights::{Loader, MappedWeights};
use crate::preprocess::image::PreprocessedImage;
use crate::stage_profile::{self, Phase};

pub struct Model {
    vision: Box<dyn VisionTower>,
    text: TextModel,
    config: ModelConfig,
    device: Device,
    dtype: DType,
    quant: Quant,
}

/// Tensor-name prefixes of the two layouts in circulation.
struct Layout {
    text: &'static str,
    vision: &'static str,
}

const PUBLISHED: Layout = Layout { text: "model", vision: "visual" };
const TRANSFORMERS_5: Layout = Layout { text: "model.language_model", vision: "model.visual" };

/// How to hold and run the weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype of activations (and of the weights when not quantized).
    pub dtype: DType,
    pub device: Device,
    pub quant: Quant,
    /// Where quantized weights are kept between starts (see [`crate::loading::quant_cache`]); `None`
    /// quantizes at every load.
    pub quant_cache: Option<PathBuf>,
}

impl Default for LoadOptions {
    /// The token-exact mode: f32 weights and activations on the CPU.
    fn default() -> Self {
        Self { dtype: DType::F32, device: Device::Cpu, quant: Quant::None, quant_cache: None }
    }
}

impl LoadOptions {
    /// Refuses combinations that would be wrong or a trap: quantized weights exist for the CPU
    /// only, and candle's bf16/f16 CPU kernels are 10-20x slower than f32 (so on the CPU,
    /// quantized or not, activations are f32).
    pub fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(Error::InvalidRequest(m));
        if self.quant != Quant::None && !self.device.is_cpu() {
            return invalid(format!("quantized weights ({}) run on the CPU only: use --quant none on CUDA", self.quant.as_str()));
        }
        if self.device.is_cpu() && self.dtype != DType::F32 {
            return invalid(format!(
                "--dtype {:?} is many times slower than f32 on the CPU: use --quant q8_0 (fast) or --dtype f32 --quant none (exact)",
                self.dtype
            ));
        }
        Ok(())
    }
}

impl Model {
    pub fn load(files: &CheckpointFiles, config: &ModelConfig, options: &LoadOptions) -> Result<Self> {
        options.validate()?;
        let LoadOptions { dtype, device, quant, quant_cache } = options;
        for path in &files.weights {
            std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        }
        let mapped = MappedWeights::open(&files.weights).map_err(|e| Error::Weights(format!("cannot read safetensors: {e}")))?;
        let cache = match quant_cache {
            Some(dir) if *quant != Quant::None => Some(Arc::new(QuantCache::open(dir, &files.weights, *quant))),
            _ => None,
        };
        let vb = Loader::new(Arc::new(mapped), *dtype, device, *quant, cache.clone());
        let layout = if vb.contains("model.language_model.embed_tokens.weight") { TRANSFORMERS_5 } else { PUBLISHED };
        if !vb.contains(&format!("{}.embed_tokens.weight", layout.text)) {
            return Err(Error::Weights(
                "no `model.embed_tokens.weight` or `model.language_model.embed_tokens.weight`: not a Qwen-VL checkpoint".into(),
            ));
        }
        let lm_head = vb.contains("lm_head.weight").then(|| vb.pp("lm_head"));
        if lm_head.is_none() && !config.text.tie_word_embeddings {
            return Err(Error::Weights("`lm_head.weight` is missing and tie_word_embeddings is false".into()));
        }
        let weights_err = |e: candle_core::Error| Error::Weights(e.to_string());
        let spec = config.family.decoder_spec(&config.text, &config.vision);
        let text = TextModel::load(vb.pp(layout.text), lm_head, &config.text, &spec).map_err(weights_err)?;
        let vision = config.vision.load(vb.pp(layout.vision)).map_err(weights_err)?;
        if let Some(cache) = cache {
            match cache.save() {
                Ok(true) => tracing::info!(path = %cache.path().display(), "quantized weights cached for the next start"),
                Ok(false) => {}
                // A read-only or full disk costs the next start time, not this one its weights.
                Err(e) => tracing::warn!(path = %cache.path().display(), "cannot cache quantized weights: {e}"),
            }
        }
        Ok(Self { vision, text, config: config.clone(), device: device.clone(), dtype: *dtype, quant: *quant })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn family(&self) -> Family {
        self.config.family
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn quant(&self) -> Quant {
        self.quant
    }

    /// Merged visual embeddings `[visual_tokens, hidden]` (and DeepStack features), one per
    /// image, each image through its own adapter (or none).
    pub fn encode_images(&self, images: &[&PreprocessedImage], adapters: &[Option<&LoraAdapter>]) -> Result<Vec<VisualEmbeds>> {
        if images.len() != adapters.len() {
            return Err(Error::InvalidRequest(format!("{} images but {} adapter choices", images.len(), adapters.len())));
        }
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let _phase = stage_profile::phase(Phase::Vision);
        let patch_len = self.config.vision.patches().patch_len();
        let mut rows = 0;
        let mut data = Vec::with_capacity(images.iter().map(|i| i.pixel_values.len()).sum());
        for img in images {
            if img.patch_len() != patch_len {
                return Err(Error::InvalidRequest(format!("image patches have {} values, the model expects {patch_len}", img.patch_len())));
            }
            rows += img.num_patches();
            data.extend_from_slice(&img.pixel_values);
        }
        let pixels = Tensor::from_vec(data, (rows, patch_len), &self.device)?.to_dtype(self.dtype)?;
        let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        Ok(self.vision.forward(&pixels, &grids, adapters)?)
    }

    /// Input embeddings for a prompt: token embeddings, with each run of image tokens replaced
    /// by that image's visual embeddings, in order; and the images' DeepStack features with the
    /// rows they belong to.
    pub fn prompt_embeds(&self, ids: &[u32], image_embeds: &[VisualEmbeds]) -> Result<(Tensor, Option<Deepstack>)> {
        let image_token = self.config.tokens.image;
        let ids_t = Tensor::new(ids, &self.device)?;
        let text = self.text.embed(&ids_t)?;
        if image_embeds.is_empty() {
            return Ok((text, None));
        }
        let mut pieces = Vec::new();
        let mut deepstack_rows = Vec::new();
        let mut images = image_embeds.iter();
        let mut i = 0;
        while i < ids.len() {
            let start = i;
            let is_image = ids[i] == image_token;
            if is_image {
                let image = images.next().ok_or_else(|| Error::InvalidRequest("more image placeholders than images".into()))?;
                let n = image.embeds.dim(0)?;
                if ids.len() < i + n || ids[i..i + n].iter().any(|&t| t != image_token) {
                    return Err(Error::InvalidRequest("image placeholders do not match the image sizes".into()));
                }
                pieces.push(image.embeds.clone());
                deepstack_rows.extend((i..i + n).map(|r| r as u32));
                i += n;
            } else {
                while i < ids.len() && ids[i] != image_token {
                    i += 1;
                }
                pieces.push(text.narrow(0, start, i - start)?);
            }
        }
        if images.next().is_some() {
            return Err(Error::InvalidRequest("more images than image placeholders".into()));
        }
        let layers = image_embeds[0].deepstack.len();
        let deepstack = if layers == 0 {
            None
        } else {
            let layer = |l: usize| Tensor::cat(&image_embeds.iter().map(|e| &e.deepstack[l]).collect::<Vec<_>>(), 0);
            Some(Deepstack { rows: deepstack_rows, layers: (0..layers).map(layer).collect::<candle_core::Result<_>>()? })
        };
        Ok((Tensor::cat(&pieces, 0)?, deepstack))
    }

    /// Embeddings of already generated tokens (decode steps).
    pub fn token_embeds(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(self.text.embed(&Tensor::new(ids, &self.device)?)?)
    }

    /// One pass over a ragged batch; f32 logits `[rows, vocab]` for each sequence's last
    /// `logit_rows` tokens.
    pub fn forward(&self, batch: &mut [SeqInput]) -> Result<Tensor> {
        Ok(self.text.forward(batch)?)
    }

    pub fn num_layers(&self) -> usize {
        self.text.num_layers()
    }

    /// Key/value cache bytes one token takes across all decoder layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        let t = &self.config.text;
        2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * self.dtype.size_in_bytes()
    }

    /// Loads and validates a PEFT LoRA adapter for this model.
    pub fn load_adapter(&self, name: &str, dir: &Path) -> Result<Arc<LoraAdapter>> {
        LoraAdapter::load(name, dir, &self.adaptable_modules(), self.dtype, &self.device)
    }

    /// `(out, in)` of every projection an adapter may target, by canonical module path.
    pub fn adaptable_modules(&self) -> HashMap<String, (usize, usize)> {
        self.text.adaptable().chain(self.vision.adaptable()).map(|l| (l.name().to_string(), l.shape())).collect()
    }

    /// Bytes the weights of every projection take (quantized or not).
    pub fn projection_bytes(&self) -> usize {
        self.text.adaptable().chain(self.vision.adaptable()).map(Linear::weight_bytes).sum()
    }
}

/// Parses `f32`, `bf16` or `f16` (and their long names).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "half" => Ok(DType::F16),
        other => Err(Error::InvalidRequest(format!("unknown dtype `{other}`: use f32, bf16 or f16"))),
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.as_str() {
        "cuda" => 0,
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::InvalidRequest(format!("unknown device `{s}`: use cpu, cuda or cuda:N")))?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::InvalidRequest(format!("device `{s}` needs a binary built with `--features cuda`")));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::InvalidRequest(format!("cannot open {s}: {e}")))
}
