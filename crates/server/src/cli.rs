//! Subcommands and their flags. The `generate` and `preprocess` interfaces are relied on by
//! scripts: change them only compatibly.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use qwen_ocr_model::config::{ModelConfig, PreprocessorConfig};
use qwen_ocr_model::loading::checkpoint::{self, DEFAULT_MODEL};
use qwen_ocr_model::preprocess::image::{ImageOptions, DEFAULT_MAX_DECODED_PIXELS};
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::{GenerateRequest, Pipeline};
use serde_json::json;

use crate::load_options::{load_options, DeviceSpec, Precision, QuantCache, QuantMode};

#[derive(Parser, Debug)]
#[command(name = "qwen-ocr", version, about = "Qwen-VL document extraction on candle")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Log level when `RUST_LOG` is unset: a server reports requests, a one-shot command only problems.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Serve(_) => "info",
            _ => "warn",
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the HTTP API (extraction, OpenAI-style chat completions, adapters, metrics).
    Serve(crate::config::ServeArgs),
    /// Run the model once on images and a prompt.
    Generate(GenerateArgs),
    /// Show (and optionally dump) what the image preprocessing feeds the model.
    Preprocess(PreprocessArgs),
    /// Fold a LoRA adapter into the base weights and write a standalone checkpoint.
    Merge(MergeArgs),
    /// Read every image and PDF page of files and folders into a JSON Lines file, resumably.
    Extract(crate::bulk::ExtractArgs),
    /// The PDF renderer's child process, which the server starts; not for people.
    #[command(name = "render-pdf", hide = true)]
    RenderPdf(crate::documents::isolated::ChildArgs),
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// The base checkpoint directory or hub id.
    #[arg(long)]
    model: String,
    /// The PEFT adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Stored dtype of the merged weights.
    #[arg(long, value_enum, ignore_case = true, default_value = "f32")]
    dtype: MergedDtype,
}

/// What `merge` can write: the f32 the merge is computed in, or bf16 as checkpoints ship.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum MergedDtype {
    F32,
    Bf16,
}

#[derive(Args, Debug)]
pub(crate) struct ModelArgs {
    /// A checkpoint directory or a Hugging Face hub id.
    #[arg(long, env = "QWEN_OCR_MODEL", default_value = DEFAULT_MODEL)]
    pub(crate) model: String,
    /// Compute dtype.
    #[arg(long, env = "QWEN_OCR_DTYPE", value_enum, ignore_case = true, default_value = "f32")]
    pub(crate) dtype: Precision,
    /// Weights: auto (q8_0 on CPU, none on CUDA), none (exact), q8_0 or q4k.
    #[arg(long, env = "QWEN_OCR_QUANT", value_enum, ignore_case = true, default_value = "auto")]
    pub(crate) quant: QuantMode,
    /// Where quantized weights are kept between starts: auto, off, or a directory.
    #[arg(long, env = "QWEN_OCR_QUANT_CACHE", default_value = "auto")]
    pub(crate) quant_cache: QuantCache,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "QWEN_OCR_DEVICE", default_value = "cpu")]
    pub(crate) device: DeviceSpec,
}

#[derive(Args, Debug)]
struct ImageArgs {
    /// Override the checkpoint's minimum pixels after resizing.
    #[arg(long)]
    min_pixels: Option<u64>,
    /// Override the checkpoint's maximum pixels after resizing.
    #[arg(long)]
    max_pixels: Option<u64>,
    /// Refuse images whose header declares more pixels than this, before decoding them.
    #[arg(long, default_value_t = DEFAULT_MAX_DECODED_PIXELS)]
    max_image_pixels: u64,
}

impl ImageArgs {
    fn options(&self) -> ImageOptions {
        ImageOptions { min_pixels: self.min_pixels, max_pixels: self.max_pixels, max_decoded_pixels: Some(self.max_image_pixels) }
    }
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    image_opts: ImageArgs,
    /// An image file; repeat for several images, omit for a text-only prompt.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate (default: generation_config.json, else 256).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// 0 for greedy; default from generation_config.json.
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    repetition_penalty: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop once the output contains this string; repeatable.
    #[arg(long)]
    stop: Vec<String>,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), applied unmerged.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PreprocessArgs {
    /// A checkpoint directory or hub id; only its preprocessor_config.json is read.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    #[command(flatten)]
    image_opts: ImageArgs,
    #[arg(long)]
    image: PathBuf,
    /// Write `pixel_values` (f32, [patches, patch_len]) to this safetensors file.
    #[arg(long)]
    dump: Option<PathBuf>,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => crate::serve::run(args),
        Command::Generate(args) => generate(args),
        Command::Preprocess(args) => preprocess(args),
        Command::Merge(args) => merge(args),
        Command::Extract(args) => crate::bulk::run(args),
        Command::RenderPdf(args) => crate::documents::isolated::child_main(args),
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let options = load_options(args.model.dtype, args.model.device, args.model.quant, &args.model.quant_cache)?;
    if args.max_tokens == Some(0) {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    let pipeline = Pipeline::load(&args.model.model, &options).with_context(|| format!("loading {}", args.model.model))?;
    let adapter = match &args.adapter {
        Some(dir) => {
            let adapter = pipeline.load_adapter(&dir.display().to_string(), dir)?;
            tracing::info!(adapter = %adapter.name, matched = ?adapter.matched, bytes = adapter.bytes, "adapter loaded");
            Some(adapter)
        }
        None => None,
    };
    let options = args.image_opts.options();
    let images = args
        .images
        .iter()
        .map(|p| pipeline.preprocess_file(p, &options).with_context(|| p.display().to_string()))
        .collect::<Result<Vec<_>>>()?;
    let mut sampling = pipeline.default_sampling();
    if let Some(t) = args.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = args.top_p {
        sampling.top_p = p;
    }
    if let Some(k) = args.top_k {
        sampling.top_k = k;
    }
    if let Some(r) = args.repetition_penalty {
        sampling.repetition_penalty = r;
    }
    sampling.seed = args.seed;
    let request = GenerateRequest {
        messages: vec![ChatMessage::user_with_images(images.len(), &args.prompt)],
        images,
        max_new_tokens: args.max_tokens,
        sampling,
        stop: args.stop,
        adapter,
        ..Default::default()
    };
    let out = pipeline.generate(&request)?;
    if args.json {
        println!(
            "{}",
            json!({
                "text": out.text,
                "token_ids": out.token_ids,
                "prompt_tokens": out.prompt_tokens,
                "image_grid_thw": out.image_grid_thw,
                "finish_reason": out.finish_reason,
            })
        );
    } else {
        println!("{}", out.text);
    }
    Ok(())
}

fn preprocess(args: PreprocessArgs) -> Result<()> {
    let family = match checkpoint::resolve_file(&args.model, "config.json")? {
        Some(path) => ModelConfig::from_file(&path)?.family,
        None => anyhow::bail!("{}: no config.json", args.model),
    };
    let config = PreprocessorConfig::for_family(family, checkpoint::resolve_file(&args.model, "preprocessor_config.json")?.as_deref())?;
    let bytes = std::fs::read(&args.image).with_context(|| args.image.display().to_string())?;
    let out = qwen_ocr_model::preprocess::image::preprocess(&bytes, &config, &args.image_opts.options())
        .with_context(|| args.image.display().to_string())?;
    if let Some(path) = &args.dump {
        let tensor =
            candle_core::Tensor::from_vec(out.pixel_values.clone(), (out.num_patches(), out.patch_len()), &candle_core::Device::Cpu)?;
        candle_core::safetensors::save(&HashMap::from([("pixel_values".to_string(), tensor)]), path)
            .with_context(|| path.display().to_string())?;
    }
    println!("{}", json!({ "grid_thw": out.grid_thw, "resized": out.resized, "visual_tokens": out.visual_tokens(config.merge_size) }));
    Ok(())
}

fn merge(args: MergeArgs) -> Result<()> {
    let dtype = match args.dtype {
        MergedDtype::F32 => candle_core::DType::F32,
        MergedDtype::Bf16 => candle_core::DType::BF16,
    };
    // The adapter is validated against the base in f32, the precision the merge is computed in.
    let pipeline =
        Pipeline::load(&args.model, &qwen_ocr_model::LoadOptions::default()).with_context(|| format!("loading {}", args.model))?;
    let adapter = pipeline.load_adapter(&args.adapter.display().to_string(), &args.adapter)?;
    let changed = qwen_ocr_model::adapters::merge::merge_adapter(&pipeline.files, &adapter, &args.out, dtype)?;
    println!("{}", json!({ "out": args.out, "merged_modules": changed, "adapter": adapter.matched }));
    Ok(())
}
