//! Generation in lockstep over a fixed set of requests: the reference loop the CLI uses, and
//! the one the scheduler's continuous batching must agree with token for token.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::adapters::lora::LoraAdapter;
use crate::config::{GenerationConfig, ModelConfig, PreprocessorConfig};
use crate::decoding::grammar::{Grammar, Vocabulary};
use crate::decoding::logprobs::{TokenLogprob, MAX_TOP_LOGPROBS};
use crate::decoding::sampling::SamplingParams;
pub use crate::decoding::sequence::PreparedPrompt;
use crate::decoding::sequence::{Phase, Sequence};
pub use crate::decoding::state::FinishReason;
use crate::decoding::state::{Decoding, DecodingOptions, Step};
use crate::error::{Error, Result};
use crate::families::{Family, VisualEmbeds};
use crate::layers::decoder::SeqInput;
use crate::layers::kv_cache::KvCache;
use crate::loading::checkpoint::{self, CheckpointFiles};
use crate::model::{LoadOptions, Model};
use crate::preprocess::image::{self, ImageOptions, PreprocessedImage};
use crate::preprocess::positions::{decode_position, prompt_positions};
use crate::preprocess::prompt::{ChatMessage, PromptBuilder};
use crate::stage_profile::{self, Op};

/// Used when neither the request nor `generation_config.json` sets a limit.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

/// Everything loaded from one checkpoint that turns requests into tokens.
pub struct Pipeline {
    pub model: Model,
    pub prompt: PromptBuilder,
    pub preprocessor: PreprocessorConfig,
    pub generation: GenerationConfig,
    pub files: CheckpointFiles,
    /// Token bytes and the grammar compiler, built on first use (only constraints and
    /// log-probabilities need them).
    vocabulary: OnceLock<std::result::Result<Vocabulary, String>>,
    /// Run the tokens a grammar forces together with the next chosen one, not a pass each
    /// (the same tokens either way). `QWEN_OCR_FAST_FORWARD=0` turns it off, to compare.
    pub fast_forward: bool,
}

impl Pipeline {
    /// Loads `model` (a directory or a hub id) to run as `options` say.
    pub fn load(model: &str, options: &LoadOptions) -> Result<Self> {
        let files = checkpoint::resolve(model)?;
        let config = ModelConfig::from_file(&files.config)?;
        let preprocessor = PreprocessorConfig::for_family(config.family, files.preprocessor_config.as_deref())?;
        let patches = config.vision.patches();
        if (preprocessor.patch_size, preprocessor.merge_size, preprocessor.temporal_patch_size)
            != (patches.patch_size, patches.spatial_merge_size, patches.temporal_patch_size)
        {
            return Err(Error::config(
                "preprocessor_config.json",
                format!(
                    "patch_size {}, merge_size {}, temporal_patch_size {} differ from config.json's vision_config ({}, {}, {})",
                    preprocessor.patch_size,
                    preprocessor.merge_size,
                    preprocessor.temporal_patch_size,
                    patches.patch_size,
                    patches.spatial_merge_size,
                    patches.temporal_patch_size
                ),
            ));
        }
        let generation = match &files.generation_config {
            Some(p) => GenerationConfig::from_file(p)?,
            None => GenerationConfig::default(),
        };
        let prompt = PromptBuilder::load(&files, config.tokens)?;
        let model = Model::load(&files, &config, options)?;
        let fast_forward = !std::env::var("QWEN_OCR_FAST_FORWARD").is_ok_and(|v| matches!(v.as_str(), "0" | "off" | "false"));
        Ok(Self { model, prompt, preprocessor, generation, files, vocabulary: OnceLock::new(), fast_forward })
    }

    pub fn family(&self) -> Family {
        self.model.family()
    }

    pub fn preprocess(&self, bytes: &[u8], options: &ImageOptions) -> Result<PreprocessedImage> {
        image::preprocess(bytes, &self.preprocessor, options)
    }

    pub fn preprocess_file(&self, path: &Path, options: &ImageOptions) -> Result<PreprocessedImage> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        self.preprocess(&bytes, options)
    }

    /// Sampling defaults from the checkpoint's `generation_config.json`.
    pub fn default_sampling(&self) -> SamplingParams {
        SamplingParams::from_generation_config(&self.generation)
    }

    /// The checkpoint's end-of-sequence ids; without `generation_config.json`, the chat
    /// format's `<|im_end|>` and `<|endoftext|>` as the tokenizer numbers them.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        if !self.generation.eos_token_ids.is_empty() {
            return self.generation.eos_token_ids.clone();
        }
        ["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| self.prompt.tokenizer().token_to_id(t)).collect()
    }

    /// Every token's bytes and the compiler of JSON-schema constraints over them.
    pub fn vocabulary(&self) -> Result<&Vocabulary> {
        self.vocabulary
            .get_or_init(|| Vocabulary::load(&self.files.tokenizer, &self.eos_token_ids()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Config { file: self.files.tokenizer.display().to_string(), reason: e.clone() })
    }

    /// Loads and validates a PEFT LoRA adapter for this model.
    pub fn load_adapter(&self, name: &str, dir: &Path) -> Result<Arc<LoraAdapter>> {
        self.model.load_adapter(name, dir)
    }

    /// Token ids of a conversation whose images are `images`, in order.
    pub fn encode_prompt(&self, messages: &[ChatMessage], images: &[PreprocessedImage]) -> Result<Vec<u32>> {
        let merge = self.model.config().vision.patches().spatial_merge_size;
        let counts: Vec<usize> = images.iter().map(|i| i.visual_tokens(merge)).collect();
        self.prompt.encode(messages, &counts)
    }

    pub fn generate(&self, request: &GenerateRequest) -> Result<GenerateOutput> {
        Ok(self.generate_batch(std::slice::from_ref(request))?.pop().expect("one output per request"))
    }

    /// Checks a request and turns it into what the decoder needs: prompt ids, their M-RoPE
    /// positions and the generation limit.
    pub fn prepare(&self, request: &GenerateRequest) -> Result<PreparedPrompt> {
        request.sampling.validate()?;
        if request.top_logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(Error::InvalidRequest(format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")));
        }
        if request.max_new_tokens == Some(0) {
            return Err(Error::InvalidRequest("max_new_tokens must be at least 1".into()));
        }
        let cfg = self.model.config();
        let ids = self.encode_prompt(&request.messages, &request.images)?;
        let grids: Vec<[usize; 3]> = request.images.iter().map(|i| i.grid_thw).collect();
        let positions = prompt_positions(&ids, &grids, &cfg.tokens, cfg.vision.patches().spatial_merge_size)?;
        let max_new = request.max_new_tokens.or(self.generation.max_new_tokens).unwrap_or(DEFAULT_MAX_NEW_TOKENS);
        Ok(PreparedPrompt { ids, positions: positions.positions, delta: positions.delta, max_new })
    }

    /// A new sequence for `request`, checked and ready to encode its images (or to prefill).
    /// `stream`: release text token by token (otherwise text is decoded only where stop strings
    /// need it, and once at the end).
    pub fn start(&self, request: GenerateRequest, stream: bool) -> Result<Sequence> {
        let prompt = self.prepare(&request)?;
        let options = DecodingOptions {
            sampling: &request.sampling,
            grammar: request.grammar.as_deref(),
            stop: &request.stop,
            top_logprobs: request.top_logprobs,
            stream,
            fast_forward: self.fast_forward,
        };
        let decoding = Decoding::new(&prompt.ids, &options, self.eos_token_ids(), prompt.max_new);
        let cache = KvCache::with_capacity(self.model.num_layers(), prompt.ids.len() + prompt.max_new);
        Ok(Sequence::new(prompt, decoding, cache, request.adapter, request.images))
    }

    /// Visual embeddings of `images`, each through its own adapter, in one pass.
    pub fn encode_images(&self, images: &[&PreprocessedImage], adapters: &[Option<&LoraAdapter>]) -> Result<Vec<VisualEmbeds>> {
        self.model.encode_images(images, adapters)
    }

    /// Encodes the images of every sequence still in its `Encode` phase, all in one pass.
    pub fn encode(&self, seqs: &mut [&mut Sequence]) -> Result<()> {
        let pending: Vec<&mut &mut Sequence> = seqs.iter_mut().filter(|s| matches!(s.phase(), Phase::Encode { .. })).collect();
        let images: Vec<&PreprocessedImage> = pending.iter().flat_map(|s| s.images_to_encode()).collect();
        let adapters: Vec<_> = pending.iter().flat_map(|s| s.images_to_encode().iter().map(|_| s.adapter.as_deref())).collect();
        let mut embeds = self.encode_images(&images, &adapters)?.into_iter();
        for seq in pending {
            let n = seq.images_to_encode().len();
            seq.set_visual_embeds(embeds.by_ref().take(n).collect())?;
        }
        Ok(())
    }

    /// One forward pass over sequences that are prefilling (the prompt, with their images
    /// spliced in) and sequences that are decoding (their last token, and any the grammar
    /// forced after it); then the tokens each released, in order: the forced ones and the
    /// next one it chose. Every sequence must be past its `Encode` phase.
    pub fn step(&self, seqs: &mut [&mut Sequence]) -> Result<Vec<Vec<Step>>> {
        let prefilling = seqs.iter().any(|s| matches!(s.phase(), Phase::Prefill { .. }));
        let _phase = stage_profile::phase(if prefilling { stage_profile::Phase::Prefill } else { stage_profile::Phase::Decode });
        let decoding = || seqs.iter().filter(|s| matches!(s.phase(), Phase::Decode));
        let new_tokens: Vec<u32> = decoding().flat_map(|s| s.decoding.tokens_from(s.cache.len()).iter().copied()).collect();
        let positions: Vec<Vec<[u32; 3]>> = decoding()
            .map(|s| (0..s.decoding.tokens_from(s.cache.len()).len()).map(|i| decode_position(s.cache.len() + i, s.prompt.delta)).collect())
            .collect();
        let new_embeds = if new_tokens.is_empty() { None } else { Some(self.model.token_embeds(&new_tokens)?) };

        let mut inputs = Vec::with_capacity(seqs.len());
        let mut preparing: Vec<&mut Decoding> = Vec::new();
        let (mut decode_row, mut offset) = (0, 0);
        for s in seqs.iter_mut() {
            let s: &mut Sequence = s;
            let logit_rows = s.decoding.logit_rows();
            let (embeds, deepstack, positions) = match s.phase() {
                Phase::Encode { .. } => return Err(Error::InvalidRequest("a sequence's images were not encoded before its step".into())),
                Phase::Prefill { images } => {
                    let (embeds, deepstack) = self.model.prompt_embeds(&s.prompt.ids, images)?;
                    (embeds, deepstack, &s.prompt.positions[..])
                }
                Phase::Decode => {
                    let positions = &positions[decode_row];
                    let embeds = new_embeds.as_ref().expect("decode rows exist").narrow(0, offset, positions.len())?;
                    decode_row += 1;
                    offset += positions.len();
                    (embeds, None, &positions[..])
                }
            };
            if s.decoding.has_preparation() {
                preparing.push(&mut s.decoding);
            }
            inputs.push(SeqInput { embeds, positions, cache: &mut s.cache, adapter: s.adapter.as_deref(), deepstack, logit_rows });
        }
        let rows_per_seq: Vec<usize> = inputs.iter().map(|i| i.logit_rows).collect();
        // Grammar masks depend only on the tokens chosen so far: compute them while the model
        // computes the logits they will apply to.
        let logits = std::thread::scope(|scope| {
            let masks = (!preparing.is_empty()).then(|| scope.spawn(move || preparing.into_iter().for_each(|d| d.prepare())));
            let logits = self.model.forward(&mut inputs);
            if let Some(Err(panic)) = masks.map(|m| m.join()) {
                std::panic::resume_unwind(panic);
            }
            logits
        })?
        .to_vec2::<f32>()?;
        drop(inputs);
        let _sampling = stage_profile::op(Op::Sampling);
        let tokenizer = self.prompt.tokenizer();
        let mut logits = logits.into_iter();
        seqs.iter_mut()
            .zip(rows_per_seq)
            .map(|(s, n)| {
                s.prefilled();
                let mut rows: Vec<Vec<f32>> = logits.by_ref().take(n).collect();
                s.decoding.step(&mut rows, tokenizer)
            })
            .collect()
    }

    /// Runs several requests in lockstep: one vision pass over every image, one prefill pass
    /// over all prompts, then one decode pass per step over the sequences still running. Each
    /// may use its own adapter and sampling; each gets the tokens it would get alone.
    pub fn generate_batch(&self, requests: &[GenerateRequest]) -> Result<Vec<GenerateOutput>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut seqs = requests.iter().map(|r| self.start(r.clone(), false)).collect::<Result<Vec<_>>>()?;
        let started = Instant::now();
        self.encode(&mut seqs.iter_mut().collect::<Vec<_>>())?;
        let vision = started.elapsed();
        let mut prefill = None;
        loop {
            let mut running: Vec<&mut Sequence> = seqs.iter_mut().filter(|s| !s.is_finished()).collect();
            if running.is_empty() {
                break;
            }
            self.step(&mut running)?;
            prefill.get_or_insert_with(|| started.elapsed());
        }

        let prefill = prefill.expect("at least one step ran");
        let decode = started.elapsed() - prefill;
        seqs.into_iter()
            .map(|s| {
                let (text, _) = s.decoding.final_text(self.prompt.tokenizer())?;
                Ok(GenerateOutput {
                    text,
                    token_ids: s.decoding.generated().to_vec(),
                    logprobs: s.decoding.logprobs().to_vec(),
                    prompt_tokens: s.decoding.prompt_len(),
                    image_grid_thw: s.image_grids.clone(),
                    finish_reason: s.decoding.finish_reason().expect("loop ends when all finished"),
                    forward_passes: s.decoding.passes(),
                    timings: Timings { queued_ms: 0.0, prefill_ms: ms(prefill), vision_ms: ms(vision), decode_ms: ms(decode) },
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub messages: Vec<ChatMessage>,
    pub images: Vec<PreprocessedImage>,
    pub max_new_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// LoRA adapter applied (unmerged) to this request only.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// A constraint every generated token must keep satisfiable (from [`Pipeline::vocabulary`]).
    pub grammar: Option<Arc<Grammar>>,
    /// Report each token's log-probability with this many alternatives; `None`: do not.
    pub top_logprobs: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    /// One per token, when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprob>,
    pub prompt_tokens: usize,
    pub image_grid_thw: Vec<[usize; 3]>,
    pub finish_reason: FinishReason,
    /// Forward passes it took (the prefill's included); fewer than its tokens when a grammar
    /// forced some.
    pub forward_passes: usize,
    pub timings: Timings,
}

/// Where a request's time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    /// Submission to admission (0 outside a scheduler).
    pub queued_ms: f64,
    /// Vision tower, prompt and first token.
    pub prefill_ms: f64,
    /// The vision tower's part of `prefill_ms`.
    pub vision_ms: f64,
    /// Every later token.
    pub decode_ms: f64,
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
