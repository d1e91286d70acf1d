//! What every handler shares: the configuration, the engine (once the model has loaded) and
//! the adapter registry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, RwLock};

use metrics_exporter_prometheus::PrometheusHandle;
use qwen_ocr_model::adapter_registry::AdapterRegistry;
use qwen_ocr_scheduler::Engine;

use crate::config::ServerConfig;
use crate::error::{ApiError, ApiResult};
use crate::on_demand::FirstLoads;

pub struct AppState {
    pub config: ServerConfig,
    engine: OnceLock<Engine>,
    pub adapters: AdapterRegistry,
    /// Adapters being loaded from the adapters folder on their first request.
    pub first_loads: FirstLoads,
    /// Extraction prompts of adapters that have one, by adapter name.
    pub adapter_prompts: RwLock<HashMap<String, String>>,
    pub metrics: PrometheusHandle,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(config: ServerConfig, metrics: PrometheusHandle) -> Self {
        Self {
            adapters: AdapterRegistry::new(config.max_adapters),
            first_loads: FirstLoads::default(),
            config,
            engine: OnceLock::new(),
            adapter_prompts: RwLock::new(HashMap::new()),
            metrics,
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The engine, or 503 while the model is still loading.
    pub fn engine(&self) -> ApiResult<&Engine> {
        self.engine.get().ok_or_else(|| ApiError::unavailable("the model is still loading"))
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

    pub fn extraction_prompt(&self, adapter: Option<&str>) -> String {
        adapter
            .and_then(|a| self.adapter_prompts.read().expect("prompts lock").get(a).cloned())
            .unwrap_or_else(|| self.config.extraction_prompt.clone())
    }
}
