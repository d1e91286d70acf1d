//! Single-request generation: the reference loop the CLI uses and the scheduler's batched
//! engine must agree with token for token.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde::Serialize;

use crate::checkpoint::{self, CheckpointFiles};
use crate::config::{GenerationConfig, ModelConfig, PreprocessorConfig};
use crate::error::{Error, Result};
use crate::image::{self, ImageOptions, PreprocessedImage};
use crate::kv_cache::KvCache;
use crate::lora::LoraAdapter;
use crate::model::Qwen2VL;
use crate::positions::{decode_position, prompt_positions};
use crate::prompt::{ChatMessage, PromptBuilder};
use crate::sampling::{Sampler, SamplingParams};
use crate::text::SeqInput;

/// Used when neither the request nor `generation_config.json` sets a limit.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

/// Everything loaded from one checkpoint that turns requests into tokens.
pub struct Pipeline {
    pub model: Qwen2VL,
    pub prompt: PromptBuilder,
    pub preprocessor: PreprocessorConfig,
    pub generation: GenerationConfig,
    pub files: CheckpointFiles,
}

impl Pipeline {
    /// Loads `model` (a directory or a hub id) for computing in `dtype` on `device`.
    pub fn load(model: &str, dtype: DType, device: &Device) -> Result<Self> {
        let files = checkpoint::resolve(model)?;
        let config = ModelConfig::from_file(&files.config)?;
        let preprocessor = match &files.preprocessor_config {
            Some(p) => PreprocessorConfig::from_file(p)?,
            None => PreprocessorConfig::default(),
        };
        let generation = match &files.generation_config {
            Some(p) => GenerationConfig::from_file(p)?,
            None => GenerationConfig::default(),
        };
        let prompt = PromptBuilder::load(&files, config.tokens)?;
        let model = Qwen2VL::load(&files, &config, dtype, device)?;
        Ok(Self { model, prompt, preprocessor, generation, files })
    }

    pub fn preprocess_file(&self, path: &Path, options: &ImageOptions) -> Result<PreprocessedImage> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        image::preprocess(&bytes, &self.preprocessor, options)
    }

    /// Sampling defaults from the checkpoint's `generation_config.json`.
    pub fn default_sampling(&self) -> SamplingParams {
        SamplingParams::from_generation_config(&self.generation)
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        if self.generation.eos_token_ids.is_empty() {
            // Qwen2-VL's <|im_end|> and <|endoftext|>, for checkpoints without generation_config.json.
            vec![151645, 151643]
        } else {
            self.generation.eos_token_ids.clone()
        }
    }

    /// Token ids of a conversation whose images are `images`, in order.
    pub fn encode_prompt(&self, messages: &[ChatMessage], images: &[PreprocessedImage]) -> Result<Vec<u32>> {
        let merge = self.model.config().vision.spatial_merge_size;
        let counts: Vec<usize> = images.iter().map(|i| i.visual_tokens(merge)).collect();
        self.prompt.encode(messages, &counts)
    }

    pub fn generate(&self, request: &GenerateRequest) -> Result<GenerateOutput> {
        request.sampling.validate()?;
        let ids = self.encode_prompt(&request.messages, &request.images)?;
        let cfg = self.model.config();
        let positions = prompt_positions(&ids, &request.images.iter().map(|i| i.grid_thw).collect::<Vec<_>>(), &cfg.tokens, cfg.vision.spatial_merge_size)?;
        let started = Instant::now();
        let image_refs: Vec<&PreprocessedImage> = request.images.iter().collect();
        let adapter = request.adapter.as_deref();
        let image_embeds = self.model.encode_images(&image_refs, &vec![adapter; image_refs.len()])?;
        let embeds = self.model.prompt_embeds(&ids, &image_embeds)?;

        let eos = self.eos_token_ids();
        let max_new = request.max_new_tokens.or(self.generation.max_new_tokens).unwrap_or(DEFAULT_MAX_NEW_TOKENS);
        let mut cache = KvCache::new(self.model.num_layers());
        let mut sampler = Sampler::new(request.sampling.clone());
        let mut history = ids.clone();
        let mut generated = Vec::new();
        let mut stop = StopChecker::new(&request.stop);
        let mut finish = FinishReason::Length;
        let mut input = SeqInput { embeds, positions: &positions.positions, cache: &mut cache, adapter };
        let mut logits = self.model.forward(std::slice::from_mut(&mut input))?;
        let prefill = started.elapsed();
        while generated.len() < max_new {
            let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
            let token = sampler.next_token(&mut row, &history);
            generated.push(token);
            history.push(token);
            if eos.contains(&token) {
                finish = FinishReason::Stop;
                break;
            }
            if stop.hit(&self.prompt, &generated)? {
                finish = FinishReason::Stop;
                break;
            }
            if generated.len() == max_new {
                break;
            }
            let pos = [decode_position(cache.len(), positions.delta)];
            let mut step = SeqInput { embeds: self.model.token_embeds(&[token])?, positions: &pos, cache: &mut cache, adapter };
            logits = self.model.forward(std::slice::from_mut(&mut step))?;
        }
        let mut text = self.prompt.decode(&generated)?;
        if let Some(cut) = stop.cut(&text) {
            text.truncate(cut);
        }
        Ok(GenerateOutput {
            text,
            token_ids: generated,
            prompt_tokens: ids.len(),
            image_grid_thw: request.images.iter().map(|i| i.grid_thw).collect(),
            finish_reason: finish,
            timings: Timings { prefill_ms: ms(prefill), decode_ms: ms(started.elapsed() - prefill) },
        })
    }
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub messages: Vec<ChatMessage>,
    pub images: Vec<PreprocessedImage>,
    pub max_new_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// LoRA adapter applied (unmerged) to this request only.
    pub adapter: Option<Arc<LoraAdapter>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub image_grid_thw: Vec<[usize; 3]>,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// Wall time of the two phases: prefill (vision tower and prompt) and decode (every later token).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timings {
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Stop strings: generation ends once the decoded text contains one, and the text is cut
/// before it.
struct StopChecker<'a> {
    stops: &'a [String],
}

impl<'a> StopChecker<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self { stops }
    }

    fn hit(&mut self, prompt: &PromptBuilder, generated: &[u32]) -> Result<bool> {
        if self.stops.is_empty() {
            return Ok(false);
        }
        let text = prompt.decode(generated)?;
        Ok(self.cut(&text).is_some())
    }

    fn cut(&self, text: &str) -> Option<usize> {
        self.stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
    }
}
