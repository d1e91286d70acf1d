//! Encoded images kept for reuse: the same pixels (same bytes and preprocessing settings)
//! under the same vision weights are encoded once.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::num::NonZeroUsize;

use lru::LruCache;
use qwen_ocr_model::adapters::lora::LoraAdapter;
use qwen_ocr_model::preprocess::image::PreprocessedImage;
use qwen_ocr_model::VisualEmbeds;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageKey {
    pixels: u64,
    grid_thw: [usize; 3],
    /// The adapter's load id when it changes the vision tower; language-only adapters share
    /// the base encoding.
    vision_adapter: Option<u64>,
}

impl ImageKey {
    pub fn new(image: &PreprocessedImage, adapter: Option<&LoraAdapter>) -> Self {
        let mut h = DefaultHasher::new();
        bytemuck::cast_slice::<f32, u8>(&image.pixel_values).hash(&mut h);
        Self { pixels: h.finish(), grid_thw: image.grid_thw, vision_adapter: adapter.filter(|a| a.touches_vision()).map(|a| a.id) }
    }

    /// The adapter the vision tower must run with for this key.
    pub fn vision_adapter<'a>(&self, adapter: Option<&'a LoraAdapter>) -> Option<&'a LoraAdapter> {
        adapter.filter(|_| self.vision_adapter.is_some())
    }
}

pub struct VisionCache {
    entries: Option<LruCache<ImageKey, VisualEmbeds>>,
}

impl VisionCache {
    /// `capacity` 0 disables caching.
    pub fn new(capacity: usize) -> Self {
        Self { entries: NonZeroUsize::new(capacity).map(LruCache::new) }
    }

    pub fn get(&mut self, key: &ImageKey) -> Option<VisualEmbeds> {
        self.entries.as_mut()?.get(key).cloned()
    }

    pub fn put(&mut self, key: ImageKey, embeds: VisualEmbeds) {
        if let Some(entries) = self.entries.as_mut() {
            entries.put(key, embeds);
        }
    }
}
