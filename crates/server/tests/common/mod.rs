//! A real `qwen-ocr serve` process on a loopback port, and small HTTP helpers around it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qwen_ocr_server::api::chat::ChatCompletionChunk;
use qwen_ocr_server::api::error::ErrorResponse;
use qwen_ocr_server::api::ops::Ready;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub mod json_schema;
pub mod pdf;

pub const PLATE_PROMPT: &str =
    "Please extract the Vehicle Sr No, Engine No, and Model from this image. Response only json format nothing else.";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn image_path(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

pub fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(image_path(name)).unwrap()
}

pub fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("adapters/tiny-tied").join(name)
}

pub fn tiny_model() -> String {
    fixtures().join("tiny-tied").display().to_string()
}

/// Runs the `qwen-ocr` binary offline.
pub fn qwen_ocr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwen-ocr")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run qwen-ocr")
}

/// What `qwen-ocr generate` prints for one image and prompt (optionally with an adapter).
pub fn generate_text(image: &str, prompt: &str, max_tokens: usize, adapter: Option<&str>) -> String {
    let (model, image, max_tokens) = (tiny_model(), image_path(image).display().to_string(), max_tokens.to_string());
    let adapter = adapter.map(|a| adapter_dir(a).display().to_string());
    let mut args = vec!["generate", "--model", &model, "--prompt", prompt, "--json", "--max-tokens", &max_tokens, "--image", &image];
    if let Some(a) = &adapter {
        args.extend(["--adapter", a.as_str()]);
    }
    let out = qwen_ocr(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    json["text"].as_str().unwrap().to_string()
}

pub struct Server {
    child: Child,
    endpoint: Endpoint,
    logs: Arc<Mutex<String>>,
    /// Holds the `--config` file of `start_with_config` for the server's lifetime.
    _config: Option<tempfile::TempDir>,
}

/// Where requests go: a server, or a gateway in front of several.
pub struct Endpoint {
    pub base: String,
}

/// A response with the headers the tests look at.
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub replica: Option<String>,
    pub request_id: Option<String>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {}", self.status, self.body))
    }
}

impl std::ops::Deref for Server {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Server {
    /// Starts the server on the tiny checkpoint with extra flags and waits until it is ready.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// Starts it with `toml` as its configuration file, plus extra flags.
    pub fn start_with_config(toml: &str, extra: &[&str]) -> Self {
        Self::start_with_config_files(toml, &[], extra)
    }

    /// Starts it with `toml` as its configuration file and `files` (name, contents) beside it.
    pub fn start_with_config_files(toml: &str, files: &[(&str, &str)], extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let config = dir.path().join("qwen-ocr.toml");
        std::fs::write(&config, toml).unwrap();
        let config = config.display().to_string();
        let mut args = vec!["--config", config.as_str()];
        args.extend(extra);
        let mut server = Self::start(&args);
        server._config = Some(dir);
        server
    }

    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_model(&tiny_model(), extra, env)
    }

    /// Starts the server on any checkpoint.
    pub fn start_model(model: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_model_within(model, extra, env, Duration::from_secs(60))
    }

    /// Starts the server and waits up to `ready_within` for the model to load. Benchmarks may
    /// time another build of the binary (`QWEN_OCR_BENCH_BINARY`) with the same harness.
    pub fn start_model_within(model: &str, extra: &[&str], env: &[(&str, &str)], ready_within: Duration) -> Self {
        let binary = std::env::var("QWEN_OCR_BENCH_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_qwen-ocr").to_string());
        let mut cmd = Command::new(binary);
        cmd.args(["serve", "--model", model, "--host", "127.0.0.1", "--port", "0"]).args(extra);
        // Hermetic: no QWEN_OCR_* setting of the developer's shell leaks in.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("QWEN_OCR_")) {
            cmd.env_remove(key);
        }
        cmd.env("RUST_LOG", "info").env("HF_HUB_OFFLINE", "1").envs(env.iter().copied());
        let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("address=").nth(1) {
                    let _ = port_tx.send(addr.split_whitespace().next().unwrap().to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr =
            port_rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("server did not start: {}", logs.lock().unwrap()));
        let server = Self { child, endpoint: Endpoint { base: format!("http://{addr}") }, logs, _config: None };
        server.wait_ready(ready_within);
        server
    }

    fn wait_ready(&self, within: Duration) {
        let started = Instant::now();
        while self.get("/ready").0 != 200 {
            assert!(started.elapsed() < within, "server never became ready: {}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends SIGTERM, as an orchestrator stopping the container does.
    pub fn terminate(&self) {
        assert!(Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().unwrap().success());
    }
}

impl Endpoint {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Any request, with the response's status, body and routing headers.
    pub fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
        let mut req = ureq::request(method, &self.url(path));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let sent = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let response = match sent {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("transport error: {e}"),
        };
        let header = |name| response.header(name).map(str::to_string);
        let (status, replica, request_id) = (response.status(), header("x-qwen-ocr-replica"), header("x-request-id"));
        Reply { status, replica, request_id, body: read_body(response) }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        finish(ureq::get(&self.url(path)).call())
    }

    pub fn post_json(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = ureq::post(&self.url(path)).set("content-type", "application/json");
        for (k, v) in headers {
            req = req.set(k, v);
        }
        json_of(finish(req.send_bytes(body.to_string().as_bytes())))
    }

    pub fn post_raw(&self, path: &str, content_type: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = ureq::post(&self.url(path)).set("content-type", content_type);
        for (k, v) in headers {
            req = req.set(k, v);
        }
        json_of(finish(req.send_bytes(body)))
    }

    /// `POST /v1/extract` as multipart: `files` are (field, filename, bytes), `fields` text parts.
    pub fn extract_multipart(&self, files: &[(&str, &str, &[u8])], fields: &[(&str, &str)], headers: &[(&str, &str)]) -> (u16, Value) {
        let boundary = "qwen-ocr-test-boundary";
        let mut body = Vec::new();
        for (name, filename, bytes) in files {
            body.extend(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend(b"\r\n");
        }
        for (name, value) in fields {
            body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes());
        }
        body.extend(format!("--{boundary}--\r\n").as_bytes());
        self.post_raw("/v1/extract", &format!("multipart/form-data; boundary={boundary}"), &body, headers)
    }

    /// A streamed chat completion: the concatenated content, the finish reason and every data line.
    pub fn chat_stream(&self, body: &Value, headers: &[(&str, &str)]) -> (String, Option<String>, Vec<String>) {
        let mut req = ureq::post(&self.url("/v1/chat/completions")).set("content-type", "application/json");
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let response = req.send_bytes(body.to_string().as_bytes()).expect("stream starts");
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        let mut text = String::new();
        let mut finish = None;
        let mut lines = Vec::new();
        for line in BufReader::new(response.into_reader()).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else { continue };
            lines.push(data.to_string());
            if data == "[DONE]" {
                break;
            }
            if let Ok(error) = serde_json::from_str::<ErrorResponse>(data) {
                panic!("stream error: {error:?}");
            }
            let chunk: ChatCompletionChunk = parse_str(data);
            if let Some(choice) = chunk.choices.first() {
                text.push_str(choice.delta.content.as_deref().unwrap_or(""));
                if let Some(f) = choice.finish_reason {
                    finish = Some(name_of(&f));
                }
            }
        }
        (text, finish, lines)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn finish(result: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match result {
        Ok(r) => (r.status(), read_body(r)),
        Err(ureq::Error::Status(code, r)) => (code, read_body(r)),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn read_body(r: ureq::Response) -> String {
    let mut s = String::new();
    r.into_reader().read_to_string(&mut s).unwrap();
    s
}

fn json_of((status, body): (u16, String)) -> (u16, Value) {
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {body}"));
    (status, json)
}

/// A chat request body with images as data: URLs, then the text.
pub fn chat_body(model: Option<&str>, images: &[&str], text: &str, max_tokens: usize) -> Value {
    use base64::Engine;
    let mut content: Vec<Value> = images
        .iter()
        .map(|i| {
            let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(image_bytes(i)));
            serde_json::json!({ "type": "image_url", "image_url": { "url": url } })
        })
        .collect();
    content.push(serde_json::json!({ "type": "text", "text": text }));
    let mut body = serde_json::json!({ "messages": [{ "role": "user", "content": content }], "max_tokens": max_tokens });
    if let Some(m) = model {
        body["model"] = m.into();
    }
    body
}

/// A response body as one of the API's types; panics, with the body, when it is not one.
pub fn parse<T: DeserializeOwned>(body: &Value) -> T {
    T::deserialize(body).unwrap_or_else(|e| panic!("not a {}: {e}: {body}", std::any::type_name::<T>()))
}

/// [`parse`] for JSON text.
pub fn parse_str<T: DeserializeOwned>(text: &str) -> T {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not a {}: {e}: {text}", std::any::type_name::<T>()))
}

/// A value's name on the wire (an enum's snake_case name).
pub fn name_of(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value).unwrap().as_str().expect("a unit variant").to_string()
}

/// Asserts an OpenAI-style error body with this status and code, whose kind maps to that status
/// and type.
pub fn assert_api_error(got: &(u16, Value), status: u16, code: &str) {
    let (s, body) = got;
    assert_eq!(*s, status, "{body}");
    let ErrorResponse { error } = parse(body);
    assert!(!error.message.is_empty(), "{body}");
    assert_eq!(error.code.to_string(), code, "{body}");
    assert_eq!((error.code.status().as_u16(), error.error_type), (status, error.code.error_type()), "{body}");
    assert_eq!(error.param, None);
}

/// A Hugging Face cache entry for hub repo `org/repo` under `hf_home`, laid out as hf-hub
/// writes it, holding copies of `files`; what `HF_HUB_OFFLINE=1` with `HF_HOME` reads.
pub fn hub_cache(hf_home: &Path, id: &str, files: &[PathBuf]) {
    let repo = hf_home.join("hub").join(format!("models--{}", id.replace('/', "--")));
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for file in files {
        std::fs::copy(file, snapshot.join(file.file_name().unwrap())).unwrap();
    }
}

/// The value of an unlabelled metric (0 when it was never recorded).
pub fn metric(server: &Endpoint, name: &str) -> f64 {
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// One (phase, op) pair of the stage profile (`QWEN_OCR_STAGE_PROFILE=1`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTotal {
    pub micros: u64,
    pub calls: u64,
}

/// The stage profile in a `/metrics` text, keyed `phase.op` (e.g. `vision.products`).
pub fn stage_profile(metrics: &str) -> std::collections::BTreeMap<String, StageTotal> {
    let label = |line: &str, key: &str| Some(line.split(&format!("{key}=\"")).nth(1)?.split('"').next()?.to_string());
    let mut profile = std::collections::BTreeMap::<String, StageTotal>::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("qwen_ocr_stage_") else { continue };
        let (Some(phase), Some(op), Some(Ok(value))) = (label(line, "phase"), label(line, "op"), line.rsplit(' ').next().map(str::parse))
        else {
            continue;
        };
        let total = profile.entry(format!("{phase}.{op}")).or_default();
        if rest.starts_with("calls_total") {
            total.calls = value;
        } else if rest.starts_with("microseconds_total") {
            total.micros = value;
        }
    }
    profile
}

/// `/ready`'s count of sequences the engine is running.
pub fn running(server: &Endpoint) -> u64 {
    let (_, body) = server.get("/ready");
    parse_str::<Ready>(&body).engine.running as u64
}

/// Waits until the engine runs nothing (cancelled streams release their adapters).
pub fn wait_idle(server: &Endpoint) {
    let started = Instant::now();
    while running(server) > 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "sequences still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A streamed chat left running: it holds its adapter until dropped (which cancels it).
pub struct OpenStream {
    pub replica: Option<String>,
    pub lines: std::io::Lines<BufReader<Box<dyn Read + Send + Sync>>>,
}

impl Endpoint {
    /// Starts a streamed chat and returns once its first chunk has arrived.
    pub fn open_stream(&self, body: &Value, headers: &[(&str, &str)]) -> OpenStream {
        let mut body = body.clone();
        body["stream"] = true.into();
        let mut req = ureq::post(&self.url("/v1/chat/completions")).set("content-type", "application/json");
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let response = req.send_bytes(body.to_string().as_bytes()).expect("stream starts");
        let replica = response.header("x-qwen-ocr-replica").map(str::to_string);
        let mut lines = BufReader::new(response.into_reader()).lines();
        assert!(lines.next().unwrap().unwrap().starts_with("data: "), "a first chunk");
        OpenStream { replica, lines }
    }
}

impl OpenStream {
    /// Reads to the end: the data lines after the first.
    pub fn finish(self) -> Vec<String> {
        self.lines.map_while(Result::ok).filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect()
    }
}

/// The resident memory of process `pid` in bytes, from `/proc/PID/status` (Linux).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS in /proc/PID/status");
    kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}
