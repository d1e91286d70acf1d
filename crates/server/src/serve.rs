//! `qwen-ocr serve`: listen at once (health answers while the model loads), load the model
//! and the configured adapters, serve, and on SIGTERM/SIGINT stop taking connections and let
//! in-flight requests finish within the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use qwen_ocr_model::adapters::registry::Residency;
use qwen_ocr_model::config::ModelConfig;
use qwen_ocr_model::Pipeline;
use qwen_ocr_scheduler::Engine;
use tokio::net::TcpListener;

use crate::config::{ServeArgs, ServerConfig};
use crate::on_demand;
use crate::profile::{read_schema_file, ProfileSpec};
use crate::state::AppState;

pub fn run(args: ServeArgs) -> Result<()> {
    let config = ServerConfig::load(args)?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?.block_on(serve(
        config,
        shutdown_signal(),
        |_| {},
        || {},
    ))
}

/// A server inside this process, on a thread of its own, for a command that sends it work
/// (`qwen-ocr extract`): it stops with the process, not on a signal.
pub struct Background {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    ready: std::sync::mpsc::Receiver<()>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Background {
    /// Starts serving `config` and returns once it listens; [`wait_ready`](Self::wait_ready)
    /// waits for the model.
    pub fn start(config: ServerConfig) -> Result<Self> {
        let (listening_tx, listening) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("qwen-ocr-server".into()).spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
            let listening = move |addr| {
                let _ = listening_tx.send(addr);
            };
            let loaded = move || {
                let _ = ready_tx.send(());
            };
            runtime.block_on(serve(config, std::future::pending(), listening, loaded))
        })?;
        match listening.recv() {
            Ok(addr) => Ok(Self { base: format!("http://{addr}"), ready, thread }),
            Err(_) => Err(Self::failure(thread)),
        }
    }

    /// Waits until the model has loaded; a model that fails to load is the error.
    pub fn wait_ready(self) -> Result<Self> {
        match self.ready.recv() {
            Ok(()) => Ok(self),
            Err(_) => Err(Self::failure(self.thread)),
        }
    }

    /// Why the server's thread ended.
    fn failure(thread: std::thread::JoinHandle<Result<()>>) -> anyhow::Error {
        match thread.join() {
            Ok(Err(e)) => e,
            Ok(Ok(())) => anyhow!("the server stopped"),
            Err(_) => anyhow!("the server thread panicked"),
        }
    }
}

/// Serves until `stop`; `listening` hears the address once bound, `loaded` once the model is.
async fn serve(
    config: ServerConfig,
    stop: impl Future<Output = ()> + Send + 'static,
    listening: impl FnOnce(SocketAddr),
    loaded: impl FnOnce(),
) -> Result<()> {
    if let Some(dir) = &config.adapters_dir {
        anyhow::ensure!(dir.is_dir(), "the adapters dir {} is not a directory", dir.display());
    }
    // An unsupported or broken config.json stops the start before anything listens.
    let model = config.model.clone();
    let family = tokio::task::spawn_blocking(move || ModelConfig::of_checkpoint(&model))
        .await?
        .with_context(|| format!("loading {}", config.model))?
        .family;
    tracing::info!(architecture = %family, "checkpoint configuration read");
    let metrics = crate::metrics::install()?;
    let addr = (config.host, config.port);
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {}:{}", addr.0, addr.1))?;
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let state = Arc::new(AppState::new(config, metrics));
    let address = listener.local_addr()?;
    tracing::info!(address = %address, model = %state.config.model, "listening");
    listening(address);

    let loader_state = state.clone();
    let loader = tokio::task::spawn_blocking(move || load(&loader_state));
    let app = crate::routes::router(state.clone());
    let shutdown_state = state.clone();
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let read_timeout = Duration::from_secs(state.config.read_timeout_secs);
    let max_connections = state.config.connection_limit();
    let server = crate::http_server::serve(listener, app, read_timeout, max_connections, async move {
        stop.await;
        tracing::info!(grace_secs = grace.as_secs(), "shutting down: finishing in-flight requests");
        shutdown_state.begin_shutdown();
        let _ = stopping_tx.send(());
    });
    let deadline = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut server = std::pin::pin!(server);
    let mut loader = std::pin::pin!(loader);
    let mut deadline = std::pin::pin!(deadline);
    let mut loaded = Some(loaded);
    loop {
        tokio::select! {
            _ = &mut server => return Ok(()),
            result = &mut loader, if loaded.is_some() => {
                result.context("model loading panicked")??;
                loaded.take().expect("loads once")();
            }
            _ = &mut deadline => {
                tracing::warn!("grace period over: dropping the requests still running");
                return Ok(());
            }
        }
    }
}

/// Loads the model and the configured adapters, then starts the engine.
fn load(state: &AppState) -> Result<()> {
    let config = &state.config;
    let options = config.load_options()?;
    let started = std::time::Instant::now();
    let pipeline = Pipeline::load(&config.model, &options).with_context(|| format!("loading {}", config.model))?;
    // Serving starts once the profiles and pinned adapters are in place: until `set_engine`,
    // requests are answered "still loading".
    let engine = Engine::start(Arc::new(pipeline), config.engine.clone());
    tracing::info!(
        architecture = %engine.family(),
        quant = options.quant.as_str(),
        amx_tiles = options.device.is_cpu() && qwen_ocr_model::kernels::amx::available(),
        projection_mib = engine.projection_bytes() >> 20,
        seconds = started.elapsed().as_secs_f64(),
        "weights loaded"
    );
    let base = ProfileSpec {
        schema: read_schema(config.extraction_schema_file.as_deref())?,
        strict: config.extraction_schema_strict,
        ..ProfileSpec::default()
    };
    let base = base.compile(None, config, &engine).map_err(|e| match &config.extraction_schema_file {
        Some(file) if e.kind == crate::error::ErrorKind::InvalidSchema => {
            anyhow!("extraction_schema_file {}: {}", file.display(), e.message)
        }
        _ => anyhow!(e.message),
    })?;
    state.set_base_profile(base);
    for (name, adapter) in &config.adapters {
        // Absolute already: the config's relative paths were resolved against its folder.
        let spec = ProfileSpec::from_config(adapter, std::path::Path::new("")).map_err(|e| anyhow!("adapter `{name}`: {}", e.message))?;
        let profile = spec.compile(Some(name), config, &engine).map_err(|e| anyhow!(e.message))?;
        state.set_profile(name, Some(profile));
        on_demand::load(state, &engine, name, &adapter.path, Residency::Pinned).with_context(|| format!("loading adapter `{name}`"))?;
    }
    state.set_engine(engine);
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded; ready");
    Ok(())
}

/// A configured schema file, read; a bad one stops the start with its path and reason.
fn read_schema(path: Option<&std::path::Path>) -> Result<Option<serde_json::Value>> {
    path.map(|p| read_schema_file(p).map_err(|e| anyhow!(e.message))).transpose()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
}
