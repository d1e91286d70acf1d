//! PEFT LoRA adapters as LLaMA-Factory writes them, applied unmerged:
//! `y = x W^T + b + scale * (x A^T) B^T`, with the adapter chosen per row span so that one
//! forward pass can carry sequences with different adapters (or none).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
// PEFT matches with Python's `re`; LLaMA-Factory's targets use look-ahead, which `regex` lacks.
use fancy_regex::Regex;
use serde_json::Value;

use crate::config::read_json;
use crate::error::{Error, Result};
use crate::json_fields::{self, optional};

/// One adapted projection: `A` is `[r, in]`, `B` is `[out, r]`.
#[derive(Debug)]
pub struct LoraModule {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// Which part of the model an adapted module belongs to, for load reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    Language,
    Vision,
    Merger,
}

impl ModuleKind {
    fn of(module: &str) -> Self {
        if module.starts_with("visual.merger.") || module.starts_with("visual.deepstack_merger_list.") {
            ModuleKind::Merger
        } else if module.starts_with("visual.") {
            ModuleKind::Vision
        } else {
            ModuleKind::Language
        }
    }
}

#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    /// Unique per load, so caches can tell a replaced adapter from the one it replaced.
    pub id: u64,
    /// Keyed by canonical module path (`model.layers.0.self_attn.q_proj`, `visual.blocks.0.attn.qkv`).
    modules: HashMap<String, LoraModule>,
    /// Adapted modules per part of the model.
    pub matched: BTreeMap<ModuleKind, usize>,
    pub bytes: usize,
}

impl LoraAdapter {
    /// Whether the adapter changes what the vision tower (or its merger) computes.
    pub fn touches_vision(&self) -> bool {
        self.matched.keys().any(|k| *k != ModuleKind::Language)
    }

    pub fn module(&self, name: &str) -> Option<&LoraModule> {
        self.modules.get(name)
    }

    /// Loads and validates `dir` against the model's projections (`shapes`: canonical module
    /// path -> `(out, in)`). Refuses anything that would silently do nothing or the wrong thing.
    pub fn load(name: &str, dir: &Path, shapes: &HashMap<String, (usize, usize)>, dtype: DType, device: &Device) -> Result<Arc<Self>> {
        let bad = |reason: String| Error::Adapter { name: name.to_string(), reason };
        if !dir.is_dir() {
            return Err(bad(format!("{} is not a directory", dir.display())));
        }
        let weights = dir.join("adapter_model.safetensors");
        if !weights.is_file() {
            if dir.join("adapter_model.bin").is_file() {
                return Err(bad("adapter_model.bin is a pickle, which is never loaded: convert it to adapter_model.safetensors".into()));
            }
            return Err(bad(format!("{} is missing", weights.display())));
        }
        let cfg = AdapterConfig::from_value(&read_json(&dir.join("adapter_config.json")).map_err(|e| bad(e.to_string()))?).map_err(bad)?;
        let tensors = candle_core::safetensors::load(&weights, device).map_err(|e| bad(format!("{}: {e}", weights.display())))?;

        // Canonical module -> (lora_A, lora_B, the path as saved, which PEFT's patterns match).
        let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>, String)> = HashMap::new();
        for (key, tensor) in tensors {
            let (path, which) = split_key(&key).ok_or_else(|| {
                bad(format!(
                    "unexpected tensor `{key}` (only lora_A/lora_B weights are supported; DoRA, embeddings and modules_to_save are not)"
                ))
            })?;
            if !cfg.targets(path) {
                return Err(bad(format!(
                    "`{key}` is for a module that target_modules does not select: the config and the weights disagree"
                )));
            }
            let slot = pairs.entry(canonical_module(path)).or_insert_with(|| (None, None, path.to_string()));
            if which == 'A' {
                slot.0 = Some(tensor);
            } else {
                slot.1 = Some(tensor);
            }
        }
        let mut unknown: Vec<&str> = pairs.keys().filter(|m| !shapes.contains_key(*m)).map(String::as_str).collect();
        if !unknown.is_empty() {
            unknown.sort();
            let shown: Vec<_> = unknown.iter().take(3).collect();
            return Err(bad(format!(
                "{} adapted modules do not exist in the model, e.g. {shown:?}: wrong base model or key layout",
                unknown.len()
            )));
        }
        if pairs.is_empty() {
            return Err(bad("the adapter holds no LoRA weights".into()));
        }
        let mut modules = HashMap::with_capacity(pairs.len());
        let mut matched = BTreeMap::new();
        let mut bytes = 0;
        for (module, (a, b, saved_path)) in pairs {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                _ => return Err(bad(format!("{module}: needs both lora_A and lora_B"))),
            };
            let (out_dim, in_dim) = shapes[&module];
            let (r, alpha) = cfg.rank_and_alpha(&saved_path);
            if a.dims() != [r, in_dim] || b.dims() != [out_dim, r] {
                return Err(bad(format!(
                    "{module}: lora_A {:?} / lora_B {:?} do not fit the base [{out_dim}, {in_dim}] with r={r}",
                    a.dims(),
                    b.dims()
                )));
            }
            let scale = if cfg.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
            let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
            bytes += (a.elem_count() + b.elem_count()) * dtype.size_in_bytes();
            *matched.entry(ModuleKind::of(&module)).or_insert(0) += 1;
            modules.insert(module, LoraModule { a, b, scale });
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(Self { name: name.to_string(), id, modules, matched, bytes }))
    }
}

/// `base_model.model.<path>.lora_{A,B}.weight` -> (module path as saved, 'A' | 'B').
fn split_key(key: &str) -> Option<(&str, char)> {
    let rest = key.strip_prefix("base_model.model.")?;
    let (path, which) = if let Some(p) = rest.strip_suffix(".lora_A.weight") {
        (p, 'A')
    } else if let Some(p) = rest.strip_suffix(".lora_B.weight") {
        (p, 'B')
    } else {
        return None;
    };
    Some((path, which))
}

/// Both weight layouts name modules the published way: `model.layers.*`, `visual.*`.
pub fn canonical_module(path: &str) -> String {
    if let Some(rest) = path.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else if let Some(rest) = path.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else {
        path.to_string()
    }
}

/// PEFT's `target_modules`: a list of names matched against the end of a module's path, or
/// one regular expression matched against the whole path.
enum Targets {
    Suffixes(Vec<String>),
    Regex(Regex),
}

/// A PEFT `adapter_config.json`, checked for what this server can apply.
pub struct AdapterConfig {
    targets: Targets,
    r: usize,
    alpha: f64,
    use_rslora: bool,
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
}

impl AdapterConfig {
    pub fn from_value(v: &Value) -> std::result::Result<Self, String> {
        if let Some(t) = optional::<String>(v, "peft_type")?.filter(|t| t != "LORA") {
            return Err(format!("peft_type {t} is not LORA"));
        }
        if optional::<bool>(v, "use_dora")? == Some(true) {
            return Err("DoRA adapters (use_dora) are not supported".into());
        }
        if optional::<Vec<Value>>(v, "modules_to_save")?.is_some_and(|m| !m.is_empty()) {
            return Err("modules_to_save (fully trained extra modules) is not supported".into());
        }
        let r = optional::<u64>(v, "r")?.filter(|&r| r > 0).ok_or("adapter_config.json needs a positive `r`")? as usize;
        let alpha = optional::<f64>(v, "lora_alpha")?.unwrap_or(8.0);
        // PEFT matches pattern keys against the end of a module's path.
        let pattern = |key: &str| -> std::result::Result<Vec<(Regex, f64)>, String> {
            let Some(obj) = optional::<serde_json::Map<String, Value>>(v, key)? else { return Ok(Vec::new()) };
            obj.iter()
                .map(|(k, val)| {
                    let re = Regex::new(&format!(r"^(.*\.)?(?:{k})$")).map_err(|e| format!("{key} `{k}`: {e}"))?;
                    Ok((re, val.as_f64().ok_or(format!("{key} `{k}` must be a number"))?))
                })
                .collect()
        };
        let targets = match v.get("target_modules") {
            Some(Value::String(re)) => Targets::Regex(Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("target_modules: {e}"))?),
            Some(list @ Value::Array(_)) => Targets::Suffixes(json_fields::value(Some(list), "target_modules")?.unwrap_or_default()),
            _ => return Err("adapter_config.json needs `target_modules` (a list or a regular expression)".into()),
        };
        Ok(Self {
            targets,
            r,
            alpha,
            use_rslora: optional::<bool>(v, "use_rslora")?.unwrap_or(false),
            // A rank below 1 would pass the shape check only with empty weights, then divide by zero.
            rank_pattern: pattern("rank_pattern")?
                .into_iter()
                .map(|(re, x)| match x {
                    x if x >= 1.0 && x.fract() == 0.0 && x <= u32::MAX as f64 => Ok((re, x as usize)),
                    x => Err(format!("rank_pattern values must be positive integers, got {x}")),
                })
                .collect::<std::result::Result<_, String>>()?,
            alpha_pattern: pattern("alpha_pattern")?,
        })
    }

    /// Whether `target_modules` selects the module at `path` (as saved).
    pub fn targets(&self, path: &str) -> bool {
        match &self.targets {
            Targets::Regex(re) => re.is_match(path).unwrap_or(false),
            Targets::Suffixes(names) => names.iter().any(|t| path == t || path.ends_with(&format!(".{t}"))),
        }
    }

    /// The rank and alpha for `module`, after `rank_pattern` and `alpha_pattern`.
    pub fn rank_and_alpha(&self, module: &str) -> (usize, f64) {
        let r = self.rank_pattern.iter().find(|(re, _)| re.is_match(module).unwrap_or(false)).map_or(self.r, |(_, r)| *r);
        let alpha = self.alpha_pattern.iter().find(|(re, _)| re.is_match(module).unwrap_or(false)).map_or(self.alpha, |(_, a)| *a);
        (r, alpha)
    }
}

/// Which adapter (if any) applies to each span of rows in a forward pass.
#[derive(Clone, Default)]
pub struct RowAdapters<'a> {
    spans: Vec<(usize, usize, Option<&'a LoraAdapter>)>,
}

impl<'a> RowAdapters<'a> {
    pub fn none() -> Self {
        Self::default()
    }

    /// Spans of `len` rows each, in order.
    pub fn from_spans(spans: impl IntoIterator<Item = (usize, Option<&'a LoraAdapter>)>) -> Self {
        let mut start = 0;
        let spans = spans
            .into_iter()
            .map(|(len, a)| {
                let s = (start, len, a);
                start += len;
                s
            })
            .collect();
        Self { spans }
    }

    /// `(first row, rows)` of each span, in order; empty for [`RowAdapters::none`].
    pub fn spans(&self) -> Vec<(usize, usize)> {
        self.spans.iter().map(|&(start, len, _)| (start, len)).collect()
    }

    /// Whether any row's adapter adapts `module`.
    pub fn adapts(&self, module: &str) -> bool {
        self.spans.iter().any(|(_, _, a)| a.is_some_and(|a| a.module(module).is_some()))
    }

    /// `y` plus every span's LoRA delta for `module`; `y` itself when no span adapts it.
    ///
    /// All adapters of the batch go through two matmuls together, so the cost does not grow
    /// with the number of spans: `U = x [A_1; A_2; ...]ᵀ` gives every row every adapter's
    /// low-rank projection, a mask keeps (and scales) only the columns of the row's own
    /// adapter, and `U [B_1, B_2, ...]ᵀ` adds the deltas.
    pub fn apply(&self, module: &str, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        // The common case (no adapter on this module in this batch) costs no allocation.
        if !self.adapts(module) {
            return Ok(y);
        }
        // Distinct adapters adapting this module, in order of first appearance.
        let mut used: Vec<(u64, &LoraModule)> = Vec::new();
        for (_, _, a) in &self.spans {
            if let Some((id, m)) = a.and_then(|a| a.module(module).map(|m| (a.id, m))) {
                if !used.iter().any(|(u, _)| *u == id) {
                    used.push((id, m));
                }
            }
        }
        let rows = x.dim(0)?;
        if let [(_, m)] = used[..] {
            if self.spans.iter().all(|(_, _, a)| a.is_some_and(|a| a.module(module).is_some())) {
                // One adapter on every row: no mask needed. Scaled before `B` as the masked path
                // is, so a sequence gets the same numbers alone and in a mixed batch.
                return y + (x.matmul(&m.a.t()?)? * m.scale)?.matmul(&m.b.t()?)?;
            }
        }
        let ranks: Vec<usize> = used.iter().map(|(_, m)| m.a.dim(0)).collect::<candle_core::Result<_>>()?;
        let total: usize = ranks.iter().sum();
        let mut mask = vec![0f32; rows * total];
        for &(start, len, a) in &self.spans {
            let Some(a) = a else { continue };
            let Some(j) = used.iter().position(|(id, _)| *id == a.id) else { continue };
            let offset: usize = ranks[..j].iter().sum();
            for row in start..start + len {
                mask[row * total + offset..][..ranks[j]].fill(used[j].1.scale as f32);
            }
        }
        let ids: Vec<u64> = used.iter().map(|(id, _)| *id).collect();
        let (a_all, b_all) = stacked(module, &ids, || {
            let a_all = Tensor::cat(&used.iter().map(|(_, m)| &m.a).collect::<Vec<_>>(), 0)?;
            let b_all = Tensor::cat(&used.iter().map(|(_, m)| &m.b).collect::<Vec<_>>(), 1)?;
            Ok((a_all, b_all))
        })?;
        let mask = Tensor::from_vec(mask, (rows, total), x.device())?.to_dtype(x.dtype())?;
        let low = (x.matmul(&a_all.t()?)? * mask)?;
        y + low.matmul(&b_all.t()?)?
    }
}

/// Each module's stacked `A`s and `B`s for the adapter set it last saw. A batch keeps the same
/// adapters for many decode steps, so stacking them once instead of every step saves copying
/// every adapted weight each step; one entry per module bounds the memory to one more copy of
/// the adapters in use. Adapter load ids are never reused, so an entry cannot describe another
/// adapter.
type Stacks = std::collections::HashMap<String, (Vec<u64>, Tensor, Tensor)>;

fn stacked(
    module: &str,
    ids: &[u64],
    make: impl FnOnce() -> candle_core::Result<(Tensor, Tensor)>,
) -> candle_core::Result<(Tensor, Tensor)> {
    static STACKS: std::sync::Mutex<Option<Stacks>> = std::sync::Mutex::new(None);
    if let Some((_, a, b)) = STACKS.lock().expect("lora stacks").as_ref().and_then(|m| m.get(module)).filter(|(k, _, _)| k == ids) {
        return Ok((a.clone(), b.clone()));
    }
    let (a, b) = make()?;
    STACKS
        .lock()
        .expect("lora stacks")
        .get_or_insert_with(Default::default)
        .insert(module.to_string(), (ids.to_vec(), a.clone(), b.clone()));
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `adapter_config` fuzz target's property: every module gets a positive rank, so
    /// `rank_pattern` may not bring back what `r` must not be.
    #[test]
    fn rank_pattern_ranks_are_positive_integers() {
        let config = |rank: Value| serde_json::json!({ "r": 8, "target_modules": ["q_proj"], "rank_pattern": { "q_proj": rank } });
        for bad in [0.0, -2.0, 2.5] {
            assert!(AdapterConfig::from_value(&config(bad.into())).is_err_and(|e| e.contains("rank_pattern")), "{bad}");
        }
        let ok = AdapterConfig::from_value(&config(4.into())).unwrap();
        assert_eq!(ok.rank_and_alpha("model.layers.0.self_attn.q_proj").0, 4);
    }

    /// A field of the wrong type is an error naming it: read as the default, `"16"` for
    /// `lora_alpha` would scale the adapter by half of what it was trained with.
    #[test]
    fn wrong_typed_fields_are_errors_not_defaults() {
        let base = serde_json::json!({ "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"] });
        assert!(AdapterConfig::from_value(&base).is_ok());
        for (key, wrong) in [
            ("lora_alpha", serde_json::json!("16")),
            ("use_rslora", serde_json::json!("true")),
            ("r", serde_json::json!("8")),
            ("target_modules", serde_json::json!(["q_proj", 3])),
            ("rank_pattern", serde_json::json!(["q_proj"])),
            ("use_dora", serde_json::json!(1)),
        ] {
            let mut config = base.clone();
            config[key] = wrong;
            let err = AdapterConfig::from_value(&config).err().unwrap_or_else(|| panic!("{key} accepted"));
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        }
        let mut nulls = base.clone();
        nulls["lora_alpha"] = Value::Null;
        assert_eq!(AdapterConfig::from_value(&nulls).unwrap().alpha, 8.0, "null is PEFT's default, as absent");
    }
}
