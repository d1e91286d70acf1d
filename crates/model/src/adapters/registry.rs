//! Named LoRA adapters resident beside the base model. Loading happens outside the lock; the
//! swap is one map insert, so a replacement is atomic and every sequence keeps the `Arc` of the
//! version it started with until it ends.
//!
//! Adapters loaded on first use (`Residency::Evictable`) may be dropped again, least recently
//! used first, to make room. One that a request still holds is never chosen: the registry's own
//! `Arc` is then not the only one, and that is checked under the write lock, so a request that
//! looks an adapter up either holds it before the check or finds it gone and loads it again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::adapters::lora::{LoraAdapter, ModuleKind};
use crate::error::{Error, Result};
use crate::model::Model;

/// Default cap on resident adapters.
pub const DEFAULT_MAX_ADAPTERS: usize = 64;

#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub matched: BTreeMap<ModuleKind, usize>,
    pub bytes: usize,
}

/// Whether the registry may unload an adapter by itself to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Configured or loaded by an operator: stays until unloaded.
    Pinned,
    /// Loaded on first use from a folder it can be loaded from again.
    Evictable,
}

/// What a load changed.
pub struct Loaded {
    /// The adapter just loaded, taken under the lock so nothing can evict it before the
    /// caller's request holds it.
    pub adapter: Arc<LoraAdapter>,
    /// The previous adapter of that name.
    pub replaced: Option<Arc<LoraAdapter>>,
    /// The adapter unloaded to make room, by name.
    pub evicted: Option<String>,
}

struct Resident {
    adapter: Arc<LoraAdapter>,
    residency: Residency,
    /// The registry's clock at the last lookup: the smallest is the least recently used.
    last_used: AtomicU64,
}

pub struct AdapterRegistry {
    adapters: RwLock<HashMap<String, Resident>>,
    max_resident: usize,
    clock: AtomicU64,
}

impl AdapterRegistry {
    pub fn new(max_resident: usize) -> Self {
        Self { adapters: RwLock::new(HashMap::new()), max_resident, clock: AtomicU64::new(0) }
    }

    /// Loads `dir` as `name`, pinned, replacing any adapter of that name; returns the replaced one.
    pub fn load(&self, model: &Model, name: &str, dir: &Path) -> Result<Option<Arc<LoraAdapter>>> {
        Ok(self.insert(name, model.load_adapter(name, dir)?, Residency::Pinned)?.replaced)
    }

    /// Makes a loaded adapter resident as `name`. At the limit, the least recently used
    /// evictable adapter that no request holds makes room; when there is none it is refused.
    pub fn insert(&self, name: &str, adapter: Arc<LoraAdapter>, residency: Residency) -> Result<Loaded> {
        let mut map = self.adapters.write().expect("adapter registry lock poisoned");
        let mut evicted = None;
        if !map.contains_key(name) && map.len() >= self.max_resident {
            let victim = least_recently_used_idle(&map).ok_or_else(|| Error::AdaptersFull { name: name.into(), resident: map.len() })?;
            map.remove(&victim);
            evicted = Some(victim);
        }
        let resident = Resident { adapter: adapter.clone(), residency, last_used: AtomicU64::new(self.tick()) };
        let replaced = map.insert(name.to_string(), resident).map(|r| r.adapter);
        Ok(Loaded { adapter, replaced, evicted })
    }

    /// The adapter, marked as just used.
    pub fn get(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        let map = self.adapters.read().expect("adapter registry lock poisoned");
        let resident = map.get(name)?;
        resident.last_used.store(self.tick(), Ordering::Relaxed);
        Some(resident.adapter.clone())
    }

    pub fn unload(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.adapters.write().expect("adapter registry lock poisoned").remove(name).map(|r| r.adapter)
    }

    /// Every resident adapter, by name.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let map = self.adapters.read().expect("adapter registry lock poisoned");
        let mut out: Vec<AdapterInfo> = map
            .values()
            .map(|r| AdapterInfo { name: r.adapter.name.clone(), matched: r.adapter.matched.clone(), bytes: r.adapter.bytes })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn resident_bytes(&self) -> usize {
        self.adapters.read().expect("adapter registry lock poisoned").values().map(|r| r.adapter.bytes).sum()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }
}

/// The evictable adapter used longest ago among those no request holds.
fn least_recently_used_idle(map: &HashMap<String, Resident>) -> Option<String> {
    map.iter()
        .filter(|(_, r)| r.residency == Residency::Evictable && Arc::strong_count(&r.adapter) == 1)
        .min_by_key(|(_, r)| r.last_used.load(Ordering::Relaxed))
        .map(|(name, _)| name.clone())
}
