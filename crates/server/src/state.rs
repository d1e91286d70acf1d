//! What every handler shares: the configuration, the engine (once the model has loaded) and
//! the adapter registry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use metrics_exporter_prometheus::PrometheusHandle;
use qwen_ocr_model::adapters::registry::AdapterRegistry;
use qwen_ocr_scheduler::Engine;
use tokio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::documents::isolated::Renderer;
use crate::error::{ApiError, ApiResult, ErrorKind};
use crate::on_demand::FirstLoads;
use crate::profile::ExtractionProfile;

pub struct AppState {
    pub config: ServerConfig,
    engine: OnceLock<Engine>,
    pub adapters: AdapterRegistry,
    /// Adapters being loaded from the adapters folder on their first request.
    pub first_loads: FirstLoads,
    /// Extraction profiles of adapters that have one, by adapter name.
    pub profiles: RwLock<HashMap<String, Arc<ExtractionProfile>>>,
    /// The base model's profile (set once the model has loaded and its schema compiled).
    base_profile: RwLock<Arc<ExtractionProfile>>,
    pub metrics: PrometheusHandle,
    shutting_down: AtomicBool,
    /// PDF renderers running at once: each is a process that takes a core while it draws.
    pub render_slots: Arc<Semaphore>,
}

impl AppState {
    pub fn new(config: ServerConfig, metrics: PrometheusHandle) -> Self {
        Self {
            adapters: AdapterRegistry::new(config.max_adapters),
            first_loads: FirstLoads::default(),
            config,
            engine: OnceLock::new(),
            profiles: RwLock::new(HashMap::new()),
            base_profile: RwLock::new(Arc::default()),
            metrics,
            shutting_down: AtomicBool::new(false),
            render_slots: Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get()))),
        }
    }

    /// The engine, or 503 while the model is still loading.
    pub fn engine(&self) -> ApiResult<&Engine> {
        self.engine.get().ok_or_else(|| ApiError::new(ErrorKind::Unavailable, "the model is still loading"))
    }

    /// The PDF renderer: this binary in a child process, within the configured limits.
    pub fn renderer(&self) -> ApiResult<Renderer> {
        Renderer::current(self.config.render_limits()).map_err(|e| ApiError::internal(format!("cannot find the PDF renderer: {e}")))
    }

    pub fn set_engine(&self, engine: Engine) {
        if self.engine.set(engine).is_err() {
            unreachable!("the model loads once");
        }
    }

    pub fn is_ready(&self) -> bool {
        self.engine.get().is_some() && !self.shutting_down.load(Ordering::Relaxed)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// The profile `/v1/extract` uses for this adapter (`None`: the base model). An adapter
    /// without one gets an empty profile: the server's prompt, no schema.
    pub fn profile(&self, adapter: Option<&str>) -> Arc<ExtractionProfile> {
        match adapter {
            None => self.base_profile.read().expect("profile lock").clone(),
            Some(a) => self.profiles.read().expect("profiles lock").get(a).cloned().unwrap_or_default(),
        }
    }

    pub fn set_base_profile(&self, profile: ExtractionProfile) {
        *self.base_profile.write().expect("profile lock") = Arc::new(profile);
    }

    /// Sets (or with `None` removes) an adapter's profile.
    pub fn set_profile(&self, adapter: &str, profile: Option<ExtractionProfile>) {
        let mut profiles = self.profiles.write().expect("profiles lock");
        match profile {
            Some(p) => profiles.insert(adapter.to_string(), Arc::new(p)),
            None => profiles.remove(adapter),
        };
    }

    pub fn extraction_prompt(&self, adapter: Option<&str>) -> String {
        self.profile(adapter).settings.prompt.clone().unwrap_or_else(|| self.config.extraction_prompt.clone())
    }
}
