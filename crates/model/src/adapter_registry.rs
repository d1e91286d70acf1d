//! Named LoRA adapters resident beside the base model. Loading happens outside the lock; the
//! swap is one map insert, so a replacement is atomic and every sequence keeps the `Arc` of the
//! version it started with until it ends.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, ModuleKind};
use crate::model::Qwen2VL;

/// Default cap on resident adapters.
pub const DEFAULT_MAX_ADAPTERS: usize = 64;

#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub matched: BTreeMap<ModuleKind, usize>,
    pub bytes: usize,
}

pub struct AdapterRegistry {
    adapters: RwLock<HashMap<String, Arc<LoraAdapter>>>,
    max_resident: usize,
}

impl AdapterRegistry {
    pub fn new(max_resident: usize) -> Self {
        Self { adapters: RwLock::new(HashMap::new()), max_resident }
    }

    /// Loads `dir` as `name`, replacing any adapter of that name; returns the replaced one.
    pub fn load(&self, model: &Qwen2VL, name: &str, dir: &Path) -> Result<Option<Arc<LoraAdapter>>> {
        let adapter = model.load_adapter(name, dir)?;
        let mut map = self.adapters.write().expect("adapter registry lock poisoned");
        if !map.contains_key(name) && map.len() >= self.max_resident {
            return Err(Error::Adapter {
                name: name.into(),
                reason: format!("{} adapters are resident, the limit; unload one first", map.len()),
            });
        }
        Ok(map.insert(name.to_string(), adapter))
    }

    pub fn get(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.adapters.read().expect("adapter registry lock poisoned").get(name).cloned()
    }

    pub fn unload(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.adapters.write().expect("adapter registry lock poisoned").remove(name)
    }

    /// Every resident adapter, by name.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let map = self.adapters.read().expect("adapter registry lock poisoned");
        let mut out: Vec<AdapterInfo> =
            map.values().map(|a| AdapterInfo { name: a.name.clone(), matched: a.matched.clone(), bytes: a.bytes }).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn resident_bytes(&self) -> usize {
        self.adapters.read().expect("adapter registry lock poisoned").values().map(|a| a.bytes).sum()
    }
}
