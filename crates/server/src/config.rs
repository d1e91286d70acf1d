//! Server configuration: one struct with every default, read from a TOML file, then
//! environment variables, then flags (each later source wins), and checked as a whole before
//! the server listens.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use ipnet::IpNet;
use qwen_ocr_model::loading::checkpoint::DEFAULT_MODEL;
use qwen_ocr_model::preprocess::image::DEFAULT_MAX_DECODED_PIXELS;
use qwen_ocr_model::LoadOptions;
use qwen_ocr_scheduler::EngineConfig;
use serde::{Deserialize, Serialize};

use crate::documents::isolated::RenderLimits;
use crate::load_options::{load_options, DeviceSpec, Precision, QuantCache, QuantMode};
use crate::profile::{check_pixel_bounds, ProfileSpec};
use crate::remote_image::FetchPolicy;

/// The least address space the PDF renderer is given.
pub const MIN_RENDER_MEMORY: u64 = 256 << 20;

/// Used by `/v1/extract` when neither the request nor the adapter's configuration gives one.
pub const DEFAULT_EXTRACTION_PROMPT: &str = "Extract the text and the key fields from this image. Respond only with JSON, nothing else.";

/// Connections beyond the requests the engine can hold, in the default `max_connections`: for
/// requests on their way to a 429, idle keep-alive connections (clients and gateways keep
/// them between requests), probes, metrics scrapes and admin calls.
pub const CONNECTION_HEADROOM: usize = 512;

/// An image may declare this many pixels whatever its file size (see `max_image_pixels_per_byte`):
/// 1024x1024, the work of an ordinary small photo.
pub const FREE_IMAGE_PIXELS: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// A checkpoint directory or a Hugging Face hub id.
    pub model: String,
    pub dtype: Precision,
    /// Weight quantization: auto, none, q8_0 or q4k.
    pub quant: QuantMode,
    /// Where quantized weights are kept between starts: auto, off, or a directory.
    pub quant_cache: QuantCache,
    pub device: DeviceSpec,
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
    /// Most connections open at once; the accept loop answers more with 503 at once.
    /// Unset: see [`ServerConfig::connection_limit`].
    pub max_connections: Option<usize>,
    /// Largest request body, and largest remote image download.
    pub max_body_bytes: usize,
    pub max_images_per_request: usize,
    /// Largest image, in pixels as its header declares them, checked before decoding.
    pub max_image_pixels: u64,
    /// An image may declare at most this many pixels per byte of its file (beyond
    /// [`FREE_IMAGE_PIXELS`]), so a tiny file cannot buy seconds of decoding; 0: no such limit.
    pub max_image_pixels_per_byte: u64,
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
    /// Networks an allowed host may resolve to although they are loopback, private,
    /// link-local or otherwise not public (refused by default: see `remote_image`).
    pub allowed_image_networks: Vec<IpNet>,
    /// The whole download of a remote image (connecting, redirects, the body).
    pub image_fetch_timeout_secs: u64,
    /// The extraction prompt for requests without one, when the adapter has none.
    pub extraction_prompt: String,
    /// A JSON Schema file that `/v1/extract` answers of the base model must validate against
    /// (relative paths resolve against the config file's folder).
    pub extraction_schema_file: Option<PathBuf>,
    /// Refuse an `extraction_schema_file` with keywords the grammar cannot enforce, instead of
    /// checking them after decoding.
    pub extraction_schema_strict: bool,
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
    /// Refuse a `schema_file` with keywords the grammar cannot enforce (default: relax them
    /// and check answers after decoding).
    #[serde(default)]
    pub strict: bool,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
}

impl AdapterConfig {
    /// An adapter with no profile of its own.
    pub fn at(path: PathBuf) -> Self {
        Self {
            path,
            prompt: None,
            schema_file: None,
            strict: false,
            max_tokens: None,
            temperature: None,
            min_pixels: None,
            max_pixels: None,
        }
    }

    /// The profile's settings, without its schema (which is read from `schema_file` later).
    pub fn settings(&self) -> ProfileSpec {
        ProfileSpec {
            prompt: self.prompt.clone(),
            schema: None,
            strict: self.strict,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.into(),
            dtype: Precision::F32,
            quant: QuantMode::Auto,
            quant_cache: QuantCache::Auto,
            device: DeviceSpec::Cpu,
            host: [0, 0, 0, 0].into(),
            port: 8080,
            replica_id: None,
            api_keys: Vec::new(),
            adapters: BTreeMap::new(),
            adapters_dir: None,
            hub_adapters: false,
            max_adapters: qwen_ocr_model::adapters::registry::DEFAULT_MAX_ADAPTERS,
            max_connections: None,
            max_body_bytes: 20 << 20,
            max_images_per_request: 8,
            max_image_pixels: DEFAULT_MAX_DECODED_PIXELS,
            max_image_pixels_per_byte: 2048,
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
            allowed_image_networks: Vec::new(),
            image_fetch_timeout_secs: 10,
            extraction_prompt: DEFAULT_EXTRACTION_PROMPT.into(),
            extraction_schema_file: None,
            extraction_schema_strict: false,
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
    /// Compute dtype.
    #[arg(long, env = "QWEN_OCR_DTYPE", value_enum, ignore_case = true)]
    pub dtype: Option<Precision>,
    /// Weights: auto (q8_0 on CPU, none on CUDA), none (exact), q8_0 or q4k.
    #[arg(long, env = "QWEN_OCR_QUANT", value_enum, ignore_case = true)]
    pub quant: Option<QuantMode>,
    /// Where quantized weights are kept between starts: auto, off, or a directory.
    #[arg(long, env = "QWEN_OCR_QUANT_CACHE")]
    pub quant_cache: Option<QuantCache>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "QWEN_OCR_DEVICE")]
    pub device: Option<DeviceSpec>,
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
        load_options(self.dtype, self.device, self.quant, &self.quant_cache)
    }

    /// The file (if any), then the environment and flags on top; checked as a whole.
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
        config.validate()?;
        Ok(config)
    }

    /// Every value checked against what it means, so that a bad one stops the start (before
    /// the server listens) naming the setting, rather than failing requests later and
    /// blaming their clients.
    pub fn validate(&self) -> Result<()> {
        let engine = &self.engine;
        let at_least_one = [
            // Zero would drop every connection before its request head could arrive.
            ("read_timeout_secs", self.read_timeout_secs),
            ("image_fetch_timeout_secs", self.image_fetch_timeout_secs),
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_images_per_request", self.max_images_per_request as u64),
            ("max_image_pixels", self.max_image_pixels),
            ("max_tokens_limit", self.max_tokens_limit as u64),
            ("max_connections", self.max_connections.unwrap_or(1) as u64),
            ("max_pdf_pages", self.max_pdf_pages as u64),
            ("pdf_page_timeout_secs", self.pdf_page_timeout_secs),
            ("engine.max_batch_size", engine.max_batch_size as u64),
            ("engine.max_queue", engine.max_queue as u64),
            ("engine.max_prefill_tokens", engine.max_prefill_tokens as u64),
            ("engine.kv_cache_bytes", engine.kv_cache_bytes as u64),
        ];
        for (name, value) in at_least_one {
            anyhow::ensure!(value >= 1, "{name} must be at least 1, got {value}");
        }
        // Below this the renderer (this binary) cannot even start, and every PDF would fail.
        anyhow::ensure!(
            self.pdf_render_memory_bytes >= MIN_RENDER_MEMORY,
            "pdf_render_memory_bytes must be at least {MIN_RENDER_MEMORY} (256 MiB), got {}",
            self.pdf_render_memory_bytes
        );
        if let Some(id) = &self.replica_id {
            anyhow::ensure!(is_header_token(id), "replica_id must be printable ASCII without spaces (it is sent as a header), got `{id}`");
        }
        check_pixel_bounds(self.min_pixels, self.max_pixels)?;
        self.image_fetch_policy().map_err(|e| anyhow!("allowed_image_hosts: {e}"))?;
        for (name, adapter) in &self.adapters {
            crate::adapter_folder::check_name(name).map_err(|e| anyhow!("adapters: {}", e.message))?;
            adapter.settings().check(Some(name), self).map_err(|e| anyhow!(e.message))?;
        }
        Ok(())
    }

    /// `max_connections`, or room for every request the engine can hold (running and queued)
    /// plus [`CONNECTION_HEADROOM`]: below the cap, overload is answered by the queue (429,
    /// the signal clients act on), and the cap only stops floods of connections. The default
    /// configuration gives 800, under the common 1024 open-file limit.
    pub fn connection_limit(&self) -> usize {
        self.max_connections.unwrap_or(self.engine.max_batch_size + self.engine.max_queue + CONNECTION_HEADROOM)
    }

    /// What remote image URLs may reach; an entry of `allowed_image_hosts` that is not a
    /// host is refused.
    pub fn image_fetch_policy(&self) -> Result<FetchPolicy, String> {
        let timeout = Duration::from_secs(self.image_fetch_timeout_secs);
        FetchPolicy::new(&self.allowed_image_hosts, &self.allowed_image_networks, timeout, self.max_body_bytes)
    }

    /// The most pixels an image of `file_bytes` bytes may declare: `max_image_pixels`, and
    /// no more than [`FREE_IMAGE_PIXELS`] plus `max_image_pixels_per_byte` for each byte.
    /// Decoding costs time in proportion to the declared pixels, while a forged header costs
    /// nothing: a few dozen bytes can declare millions of pixels. Measured on a 300-dpi A4
    /// page (8.7 million pixels): written full, 6-60 pixels a byte in any format; holding one
    /// word, about 1900 as a 1-bit PNG and 2200 as lossless WebP; so 2048 (the default) refuses
    /// no document worth reading.
    pub fn image_pixel_budget(&self, file_bytes: usize) -> u64 {
        match self.max_image_pixels_per_byte {
            0 => self.max_image_pixels,
            per_byte => FREE_IMAGE_PIXELS.saturating_add(per_byte.saturating_mul(file_bytes as u64)).min(self.max_image_pixels),
        }
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
            (config.port, config.dtype, config.api_keys.as_slice(), config.engine.max_queue),
            (9100, Precision::Bf16, &["a".to_string()][..], 3)
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

    fn load_toml(text: &str) -> Result<ServerConfig> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, text).unwrap();
        ServerConfig::load(ServeArgs { config: Some(file), ..ServeArgs::default() })
    }

    /// Each bad value stops the load with an error that names it; none becomes a default.
    #[test]
    fn bad_values_are_refused_naming_the_setting() {
        for (text, names) in [
            ("max_body_bytes = 0\n", "max_body_bytes"),
            ("max_connections = 0\n", "max_connections"),
            ("[engine]\nmax_batch_size = 0\n", "engine.max_batch_size"),
            ("min_pixels = 10\nmax_pixels = 5\n", "min_pixels 10 exceeds max_pixels 5"),
            ("max_pixels = 20000000\n", "max_pixels 20000000 is over"),
            ("max_tokens_limit = \"many\"\n", "max_tokens_limit"),
            ("quant = \"q5\"\n", "q5"),
            ("device = \"tpu\"\n", "tpu"),
            ("allowed_image_hosts = [\"images.example.com:443\"]\n", "allowed_image_hosts"),
            ("allowed_image_networks = [\"10.0.0.0/33\"]\n", "allowed_image_networks"),
            ("[adapters.a]\npath = \"/a\"\ntemperature = nan\n", "adapter `a`: temperature"),
            ("[adapters.a]\npath = \"/a\"\nmax_tokens = 5000\n", "max_tokens 5000 is over the server's max_tokens_limit (4096)"),
            ("[adapters.base]\npath = \"/a\"\n", "adapters"),
        ] {
            let err = format!("{:#}", load_toml(text).err().unwrap_or_else(|| panic!("accepted: {text}")));
            assert!(err.contains(names), "{text}: {err}");
        }
        let typed = load_toml("dtype = \"bf16\"\nquant = \"none\"\ndevice = \"cuda:1\"\nquant_cache = \"off\"\n").unwrap();
        assert_eq!(
            (typed.dtype, typed.quant, typed.device, typed.quant_cache),
            (Precision::Bf16, QuantMode::None, DeviceSpec::Cuda(1), QuantCache::Off)
        );
    }

    #[test]
    fn the_connection_cap_defaults_to_what_the_engine_can_hold_and_some() {
        let config = ServerConfig::default();
        assert_eq!(config.connection_limit(), 32 + 256 + CONNECTION_HEADROOM);
        assert_eq!(ServerConfig { max_connections: Some(7), ..config }.connection_limit(), 7);
    }

    #[test]
    fn the_pixel_budget_grows_with_the_file_up_to_max_image_pixels() {
        let config = ServerConfig::default();
        assert_eq!(config.image_pixel_budget(44), FREE_IMAGE_PIXELS + 44 * 2048);
        assert!(config.image_pixel_budget(44) < 512 * 16386, "the 44-byte GIF's canvas is over its budget");
        assert_eq!(config.image_pixel_budget(1 << 30), config.max_image_pixels);
        let unlimited = ServerConfig { max_image_pixels_per_byte: 0, ..ServerConfig::default() };
        assert_eq!(unlimited.image_pixel_budget(44), unlimited.max_image_pixels);
    }
}
