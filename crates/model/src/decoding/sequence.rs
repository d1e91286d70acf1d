//! One request's state from admission to its last token, owned in one place: its prompt, its
//! decoding state, its KV cache, its adapter, and the phase it is in. The lockstep loop and the
//! scheduler both hold these and hand them to the pipeline's `step`.

use std::sync::Arc;

use crate::adapters::lora::LoraAdapter;
use crate::decoding::state::Decoding;
use crate::error::{Error, Result};
use crate::families::VisualEmbeds;
use crate::layers::kv_cache::KvCache;
use crate::preprocess::image::PreprocessedImage;

/// Where a sequence stands. It only moves forward: `Encode` (when it has images) to `Prefill`
/// to `Decode`.
#[derive(Debug)]
pub enum Phase {
    /// Its images have yet to go through the vision tower.
    Encode { images: Vec<PreprocessedImage> },
    /// The next step runs its whole prompt, these visual embeddings spliced in.
    Prefill { images: Vec<VisualEmbeds> },
    /// The next step runs its last generated token.
    Decode,
}

/// A request ready for the decoder.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub ids: Vec<u32>,
    /// `(t, h, w)` rotary position of every prompt token.
    pub positions: Vec<[u32; 3]>,
    /// Offset from cache length to the text position of generated tokens.
    pub delta: i64,
    pub max_new: usize,
}

pub struct Sequence {
    pub prompt: PreparedPrompt,
    pub decoding: Decoding,
    pub cache: KvCache,
    /// LoRA adapter applied (unmerged) to this sequence only; dropped once it is done.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// `(t, h, w)` in patches of each prompt image, for the response.
    pub image_grids: Vec<[usize; 3]>,
    phase: Phase,
}

impl Sequence {
    pub(crate) fn new(
        prompt: PreparedPrompt,
        decoding: Decoding,
        cache: KvCache,
        adapter: Option<Arc<LoraAdapter>>,
        images: Vec<PreprocessedImage>,
    ) -> Self {
        let image_grids = images.iter().map(|i| i.grid_thw).collect();
        let phase = if images.is_empty() { Phase::Prefill { images: Vec::new() } } else { Phase::Encode { images } };
        Self { prompt, decoding, cache, adapter, image_grids, phase }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The images still to encode (none past the `Encode` phase).
    pub fn images_to_encode(&self) -> &[PreprocessedImage] {
        match &self.phase {
            Phase::Encode { images } => images,
            _ => &[],
        }
    }

    /// Hands over the visual embeddings of [`Self::images_to_encode`], in order: the sequence
    /// is then ready to prefill.
    pub fn set_visual_embeds(&mut self, embeds: Vec<VisualEmbeds>) -> Result<()> {
        match &self.phase {
            Phase::Encode { images } if images.len() == embeds.len() => {
                self.phase = Phase::Prefill { images: embeds };
                Ok(())
            }
            Phase::Encode { images } => {
                Err(Error::InvalidRequest(format!("{} images but {} visual embeddings", images.len(), embeds.len())))
            }
            _ => Err(Error::InvalidRequest("the sequence's images are already encoded".into())),
        }
    }

    pub fn is_prefilling(&self) -> bool {
        matches!(self.phase, Phase::Prefill { .. })
    }

    /// After a step: the prompt is in the cache.
    pub(crate) fn prefilled(&mut self) {
        self.phase = Phase::Decode;
    }

    /// Tokens this sequence may ever hold in its cache.
    pub fn max_tokens(&self) -> usize {
        self.prompt.ids.len() + self.prompt.max_new
    }

    pub fn is_finished(&self) -> bool {
        self.decoding.finish_reason().is_some()
    }
}
