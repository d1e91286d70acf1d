//! Folding a LoRA adapter into the base weights (`W + scale * B A`) and writing a checkpoint with
//! the base checkpoint's tensor names (each family's transformers class loads its own layout),
//! as LLaMA-Factory's export does, with the tokenizer, config and preprocessor files copied.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};

use crate::adapters::lora::{canonical_module, LoraAdapter};
use crate::error::{Error, Result};
use crate::loading::checkpoint::CheckpointFiles;

/// Writes `out/model.safetensors` (in `dtype`) and the checkpoint's other files.
/// Returns how many weights were changed.
pub fn merge_adapter(files: &CheckpointFiles, adapter: &LoraAdapter, out: &Path, dtype: DType) -> Result<usize> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut merged = HashMap::new();
    let mut changed = 0;
    for shard in &files.weights {
        for (key, tensor) in candle_core::safetensors::load(shard, &Device::Cpu)? {
            let name = canonical_module(&key);
            let module = name.strip_suffix(".weight").unwrap_or(&name);
            let tensor = match adapter.module(module) {
                Some(lora) => {
                    changed += 1;
                    let delta = lora
                        .b
                        .to_device(&Device::Cpu)?
                        .to_dtype(DType::F32)?
                        .matmul(&lora.a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?;
                    (tensor.to_dtype(DType::F32)? + (delta * lora.scale)?)?
                }
                None => tensor,
            };
            merged.insert(key, tensor.to_dtype(dtype)?);
        }
    }
    let expected: usize = adapter.matched.values().sum();
    if changed != expected {
        return Err(Error::Adapter { name: adapter.name.clone(), reason: format!("merged {changed} of {expected} adapted weights") });
    }
    let weights = out.join("model.safetensors");
    candle_core::safetensors::save(&merged, &weights).map_err(|e| Error::Weights(format!("{}: {e}", weights.display())))?;
    let others = [
        Some(&files.config),
        files.generation_config.as_ref(),
        files.preprocessor_config.as_ref(),
        Some(&files.tokenizer),
        files.tokenizer_config.as_ref(),
        files.chat_template_json.as_ref(),
        files.chat_template_jinja.as_ref(),
    ];
    for src in others.into_iter().flatten() {
        let dst = out.join(src.file_name().expect("checkpoint files have names"));
        std::fs::copy(src, &dst).map_err(|e| Error::io(&dst, e))?;
    }
    Ok(changed)
}
