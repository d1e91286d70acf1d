//! Server configuration: one struct with every default, read from a TOML file, then
//! environment variables, then flags (each later source wins).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use qwen_ocr_model::checkpoint::DEFAULT_MODEL;
use qwen_ocr_model::image::DEFAULT_MAX_DECODED_PIXELS;
use qwen_ocr_model::model::{parse_device, parse_dtype};
use qwen_ocr_model::{LoadOptions, Quant};
use qwen_ocr_scheduler::EngineConfig;
use serde::{Deserialize, Serialize};

use crate::documents::isolated::RenderLimits;

/// The least address space the PDF renderer is given.
pub const MIN_RENDER_MEMORY: u64 = 256 << 20;

/// Used by `/v1/extract` when neither the request nor the adapter's configuration gives one.
pub const DEFAULT_EXTRACTION_PROMPT: &str = "Extract the text and the key fields from this image. Respond only with JSON, nothing else.";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// A checkpoint directory or a Hugging Face hub id.
    pub model: String,
    pub dtype: String,
    /// Weight quantization: auto, none, q8_0 or q4k.
    pub quant: String,
    /// Where quantized weights are kept between starts: auto, off, or a directory.
    pub quant_cache: String,
    pub device: String,
    pub host: IpAddr,
    pub port: u16,
    /// Names this replica in the `x-qwen-ocr-replica` response header; unset: the host name.
    pub replica_id: Option<String>,
    /// Bearer keys accepted on `/v1/*`; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Adapters loaded at start-up, by name.
    pub adapters: BTreeMap<String, AdapterConfig>,
    /// Adapters folder: its subfolders load on their first request, and `POST /v1/adapters`
    /// may load from it and nowhere else. Unset: only configured adapters.
    pub adapters_dir: Option<PathBuf>,
    /// Whether adapters named `org/repo` load from the Hugging Face hub on first use.
    pub hub_adapters: bool,
    /// Most LoRA adapters resident at once.
    pub max_adapters: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    pub max_images_per_request: usize,
    /// Largest image, in pixels as its header declares them, checked before decoding.
    pub max_image_pixels: u64,
    /// Override the checkpoint's pixel range after resizing.
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
    /// Highest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Most pages one PDF request may read; a longer document needs `pages`.
    pub max_pdf_pages: usize,
    /// Rendering one PDF page (or opening the document) taking longer than this fails that page.
    pub pdf_page_timeout_secs: u64,
    /// Address space of the process that renders a PDF's pages: a page needing more fails.
    pub pdf_render_memory_bytes: u64,
    /// A request not finished after this long ends with a timeout.
    pub request_timeout_secs: u64,
    /// A request head not complete within this long closes its connection, and a body not
    /// fully received this long after its head gets 408: a client trickling its request
    /// cannot hold a connection or a worker forever.
    pub read_timeout_secs: u64,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace_secs: u64,
    /// Suggested wait sent with 429 responses.
    pub retry_after_secs: u64,
    /// Hosts whose `http(s)` image URLs chat requests may use; others are refused.
    pub allowed_image_hosts: Vec<String>,
    /// The extraction prompt for requests without one, when the adapter has none.
    pub extraction_prompt: String,
    /// A JSON Schema file that `/v1/extract` answers of the base model must validate against
    /// (relative paths resolve against the config file's folder).
    pub extraction_schema_file: Option<PathBuf>,
    pub engine: EngineConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    pub path: PathBuf,
    /// This adapter's extraction profile: the prompt it was fine-tuned on, the JSON Schema of
    /// its answers (relative paths resolve against the config file's folder), its generation
    /// settings and the pixel range its images were trained at.
    pub prompt: Option<String>,
    pub schema_file: Option<PathBuf>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
}

impl AdapterConfig {
    /// An adapter with no profile of its own.
    pub fn at(path: PathBuf) -> Self {
        Self { path, prompt: None, schema_file: None, max_tokens: None, temperature: None, min_pixels: None, max_pixels: None }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.into(),
            dtype: "f32".into(),
            quant: "auto".into(),
            quant_cache: "auto".into(),
            device: "cpu".into(),
            host: [0, 0, 0, 0].into(),
            port: 8080,
            replica_id: None,
            api_keys: Vec::new(),
            adapters: BTreeMap::new(),
            adapters_dir: None,
            hub_adapters: false,
            max_adapters: qwen_ocr_model::adapter_registry::DEFAULT_MAX_ADAPTERS,
            max_body_bytes: 20 << 20,
            max_images_per_request: 8,
            max_image_pixels: DEFAULT_MAX_DECODED_PIXELS,
            min_pixels: None,
            max_pixels: None,
            max_tokens_limit: 4096,
            max_pdf_pages: 32,
            pdf_page_timeout_secs: 30,
            pdf_render_memory_bytes: 2 << 30,
            request_timeout_secs: 300,
            read_timeout_secs: 30,
            shutdown_grace_secs: 30,
            retry_after_secs: 1,
            allowed_image_hosts: Vec::new(),
            extraction_prompt: DEFAULT_EXTRACTION_PROMPT.into(),
            extraction_schema_file: None,
            engine: EngineConfig::default(),
        }
    }
}

/// `qwen-ocr serve` flags; each also reads `QWEN_OCR_<NAME>` from the environment.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file (see config/qwen-ocr.toml).
    #[arg(long, env = "QWEN_OCR_CONFIG")]
    pub config: Option<PathBuf>,
    /// A checkpoint directory or a Hugging Face hub id.
    #[arg(long, env = "QWEN_OCR_MODEL")]
    pub model: Option<String>,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, env = "QWEN_OCR_DTYPE")]
    pub dtype: Option<String>,
    /// Weights: auto (q8_0 on CPU, none on CUDA), none (exact), q8_0 or q4k.
    #[arg(long, env = "QWEN_OCR_QUANT")]
    pub quant: Option<String>,
    /// Where quantized weights are kept between starts: auto, off, or a directory.
    #[arg(long, env = "QWEN_OCR_QUANT_CACHE")]
    pub quant_cache: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "QWEN_OCR_DEVICE")]
    pub device: Option<String>,
    #[arg(long, env = "QWEN_OCR_HOST")]
    pub host: Option<IpAddr>,
    /// 0 picks a free port (the log says which).
    #[arg(long, env = "QWEN_OCR_PORT")]
    pub port: Option<u16>,
    /// This replica's name in the `x-qwen-ocr-replica` response header (default: the host name).
    #[arg(long, env = "QWEN_OCR_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// NAME=DIR: a LoRA adapter to load at start-up; repeatable (env: comma-separated).
    #[arg(long = "adapter", env = "QWEN_OCR_ADAPTERS", value_delimiter = ',', value_parser = parse_adapter)]
    pub adapters: Vec<(String, PathBuf)>,
    /// Adapters folder: NAME loads DIR/NAME on its first request; `POST /v1/adapters` is confined to it.
    #[arg(long, env = "QWEN_OCR_ADAPTERS_DIR")]
    pub adapters_dir: Option<PathBuf>,
    /// A bearer key clients must send; repeatable (env: comma-separated).
    #[arg(long = "api-key", env = "QWEN_OCR_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
}

fn parse_adapter(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => Ok((name.to_string(), PathBuf::from(dir))),
        _ => Err(format!("expected NAME=DIR, got `{s}`")),
    }
}

impl ServerConfig {
    /// The dtype, device and quantization to load the model with.
    pub fn load_options(&self) -> Result<LoadOptions> {
        load_options(&self.dtype, &self.device, &self.quant, &self.quant_cache)
    }

    /// The file (if any), then the environment and flags on top.
    pub fn load(args: ServeArgs) -> Result<Self> {
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        let ServeArgs { config: _, model, dtype, quant, quant_cache, device, host, port, replica_id, adapters, adapters_dir, api_keys } =
            args;
        config.model = model.unwrap_or(config.model);
        config.dtype = dtype.unwrap_or(config.dtype);
        config.quant = quant.unwrap_or(config.quant);
        config.quant_cache = quant_cache.unwrap_or(config.quant_cache);
        config.device = device.unwrap_or(config.device);
        config.host = host.unwrap_or(config.host);
        config.port = port.unwrap_or(config.port);
        config.replica_id = replica_id.or(config.replica_id);
        config.adapters_dir = adapters_dir.or(config.adapters_dir);
        if !api_keys.is_empty() {
            config.api_keys = api_keys;
        }
        for (name, path) in adapters {
            config.adapters.insert(name, AdapterConfig::at(path));
        }
        config.api_keys.retain(|k| !k.is_empty());
        // Zero would drop every connection before its request head could arrive.
        anyhow::ensure!(config.read_timeout_secs > 0, "read_timeout_secs must be at least 1");
        anyhow::ensure!(config.max_pdf_pages > 0, "max_pdf_pages must be at least 1");
        anyhow::ensure!(config.pdf_page_timeout_secs > 0, "pdf_page_timeout_secs must be at least 1");
        // Below this the renderer (this binary) cannot even start, and every PDF would fail.
        anyhow::ensure!(
            config.pdf_render_memory_bytes >= MIN_RENDER_MEMORY,
            "pdf_render_memory_bytes must be at least {MIN_RENDER_MEMORY} (256 MiB), got {}",
            config.pdf_render_memory_bytes
        );
        if let Some(id) = &config.replica_id {
            anyhow::ensure!(is_header_token(id), "replica_id must be printable ASCII without spaces (it is sent as a header), got `{id}`");
        }
        Ok(config)
    }

    /// This replica's name: the configured one, else the host name (a container's or pod's).
    pub fn replica_name(&self) -> String {
        let hostname = || {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|h| h.trim().to_string())
        };
        self.replica_id.clone().or_else(hostname).filter(|h| is_header_token(h)).unwrap_or_else(|| "qwen-ocr".into())
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text, path.parent().unwrap_or(Path::new("")))
            .with_context(|| format!("invalid configuration in {}", path.display()))
    }

    /// A configuration file's text; relative schema paths resolve against `folder`.
    pub fn from_toml(text: &str, folder: &Path) -> Result<Self> {
        let mut config: Self = toml::from_str(text)?;
        let schema_files =
            config.adapters.values_mut().filter_map(|a| a.schema_file.as_mut()).chain(config.extraction_schema_file.as_mut());
        for file in schema_files {
            *file = folder.join(&*file);
        }
        Ok(config)
    }
}

impl ServerConfig {
    /// How PDF pages are rendered: in a child process of this binary, within these limits.
    pub fn render_limits(&self) -> RenderLimits {
        RenderLimits { page_timeout: Duration::from_secs(self.pdf_page_timeout_secs), memory_bytes: self.pdf_render_memory_bytes }
    }
}

/// Non-empty printable ASCII without spaces: valid as a header value, and one word in logs.
fn is_header_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic())
}

/// Parses the load settings together: `auto` quantization depends on the device.
pub fn load_options(dtype: &str, device: &str, quant: &str, quant_cache: &str) -> Result<LoadOptions> {
    let device = parse_device(device)?;
    let quant_cache = match quant_cache {
        "off" | "" => None,
        "auto" => default_quant_cache(),
        dir => Some(PathBuf::from(dir)),
    };
    let options = LoadOptions { dtype: parse_dtype(dtype)?, quant: Quant::parse(quant, &device)?, device, quant_cache };
    options.validate()?;
    Ok(options)
}

/// `$XDG_CACHE_HOME/qwen-ocr/quantized`, else `~/.cache/qwen-ocr/quantized`.
fn default_quant_cache() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("qwen-ocr").join("quantized"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented file states the real defaults.
    #[test]
    fn the_documented_config_file_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/qwen-ocr.toml");
        let documented = serde_json::to_value(ServerConfig::from_file(&path).unwrap()).unwrap();
        assert_eq!(documented, serde_json::to_value(ServerConfig::default()).unwrap());
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "port = 9000\ndtype = \"bf16\"\napi_keys = [\"a\"]\n[engine]\nmax_queue = 3\n").unwrap();
        let args = ServeArgs { config: Some(file), port: Some(9100), ..ServeArgs::default() };
        let config = ServerConfig::load(args).unwrap();
        assert_eq!(
            (config.port, config.dtype.as_str(), config.api_keys.as_slice(), config.engine.max_queue),
            (9100, "bf16", &["a".to_string()][..], 3)
        );
    }

    #[test]
    fn a_replica_id_must_be_usable_as_a_header_and_defaults_to_the_host_name() {
        let args = ServeArgs { replica_id: Some("replica a".into()), ..ServeArgs::default() };
        assert!(format!("{:#}", ServerConfig::load(args).unwrap_err()).contains("replica_id"));
        let named = ServerConfig::load(ServeArgs { replica_id: Some("replica-a".into()), ..ServeArgs::default() }).unwrap();
        assert_eq!(named.replica_name(), "replica-a");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(ServerConfig::default().replica_name(), host.trim());
    }

    #[test]
    fn a_zero_read_timeout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "read_timeout_secs = 0\n").unwrap();
        let err = format!("{:#}", ServerConfig::load(ServeArgs { config: Some(file), ..ServeArgs::default() }).unwrap_err());
        assert!(err.contains("read_timeout_secs"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "prot = 9000\n").unwrap();
        let err = format!("{:#}", ServerConfig::from_file(&file).unwrap_err());
        assert!(err.contains("prot"), "{err}");
    }
}
