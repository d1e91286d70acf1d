//! Adapters that would silently do nothing or the wrong thing are refused with a reason.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use qwen_ocr_model::{LoadOptions, Pipeline};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn good_adapter() -> PathBuf {
    fixtures().join("adapters/tiny-tied/lm-qv-r4")
}

/// A copy of the good adapter with its tensors rewritten by `edit`.
fn edited(edit: impl Fn(HashMap<String, Tensor>) -> HashMap<String, Tensor>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(good_adapter().join("adapter_config.json"), dir.path().join("adapter_config.json")).unwrap();
    let tensors = candle_core::safetensors::load(good_adapter().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&edit(tensors), dir.path().join("adapter_model.safetensors")).unwrap();
    dir
}

fn refusal(pipeline: &Pipeline, dir: &Path) -> String {
    match pipeline.model.load_adapter("test", dir) {
        Ok(_) => panic!("adapter at {} was accepted", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn mismatched_adapters_are_refused_with_the_reason() {
    let pipeline = Pipeline::load(fixtures().join("tiny-tied").to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert!(pipeline.model.load_adapter("ok", &good_adapter()).is_ok());

    let renamed = edited(|t| t.into_iter().map(|(k, v)| (k.replace("base_model.model.model.", "base_model.model.decoder."), v)).collect());
    let msg = refusal(&pipeline, renamed.path());
    assert!(msg.contains("do not exist in the model"), "{msg}");

    let reshaped = edited(|t| {
        t.into_iter()
            .map(|(k, v)| {
                if k.contains("layers.0.self_attn.q_proj.lora_A") {
                    (k, Tensor::zeros((4, 7), v.dtype(), &Device::Cpu).unwrap())
                } else {
                    (k, v)
                }
            })
            .collect()
    });
    let msg = refusal(&pipeline, reshaped.path());
    assert!(msg.contains("do not fit the base"), "{msg}");

    let half = edited(|t| t.into_iter().filter(|(k, _)| !k.contains("layers.1.self_attn.v_proj.lora_B")).collect());
    let msg = refusal(&pipeline, half.path());
    assert!(msg.contains("needs both lora_A and lora_B"), "{msg}");

    let empty = tempfile::tempdir().unwrap();
    let msg = refusal(&pipeline, empty.path());
    assert!(msg.contains("adapter_model.safetensors is missing"), "{msg}");

    let pickled = tempfile::tempdir().unwrap();
    std::fs::write(pickled.path().join("adapter_model.bin"), b"pickle").unwrap();
    let msg = refusal(&pipeline, pickled.path());
    assert!(msg.contains("pickle"), "{msg}");

    let narrowed = edited(|t| t);
    let cfg = std::fs::read_to_string(narrowed.path().join("adapter_config.json")).unwrap().replace("\"v_proj\"", "\"k_proj\"");
    std::fs::write(narrowed.path().join("adapter_config.json"), cfg).unwrap();
    let msg = refusal(&pipeline, narrowed.path());
    assert!(msg.contains("target_modules does not select"), "{msg}");

    let dora = edited(|t| t);
    let cfg =
        std::fs::read_to_string(dora.path().join("adapter_config.json")).unwrap().replace("\"use_dora\": false", "\"use_dora\": true");
    std::fs::write(dora.path().join("adapter_config.json"), cfg).unwrap();
    let msg = refusal(&pipeline, dora.path());
    assert!(msg.contains("DoRA"), "{msg}");
}

#[test]
fn registry_replaces_atomically_unloads_and_caps() {
    use qwen_ocr_model::adapters::registry::AdapterRegistry;
    let pipeline = Pipeline::load(fixtures().join("tiny-tied").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let dir = |a: &str| fixtures().join("adapters/tiny-tied").join(a);
    let registry = AdapterRegistry::new(2);
    assert!(registry.load(&pipeline.model, "plates", &dir("lm-qv-r4")).unwrap().is_none());
    let in_flight = registry.get("plates").unwrap();
    // Replacing the name hands back the old version, which a running sequence still holds.
    let replaced = registry.load(&pipeline.model, "plates", &dir("lm-all-rslora-regex")).unwrap().unwrap();
    assert!(std::sync::Arc::ptr_eq(&replaced, &in_flight));
    assert!(in_flight.module("model.layers.0.mlp.up_proj").is_none());
    assert!(registry.get("plates").unwrap().module("model.layers.0.mlp.up_proj").is_some());
    // A refused load leaves the registry as it was.
    let empty = tempfile::tempdir().unwrap();
    assert!(registry.load(&pipeline.model, "plates", empty.path()).is_err());
    assert!(registry.get("plates").unwrap().module("model.layers.0.mlp.up_proj").is_some());

    registry.load(&pipeline.model, "vision", &dir("vision-merger-pattern")).unwrap();
    let err = registry.load(&pipeline.model, "third", &dir("lm-qv-r4")).unwrap_err().to_string();
    assert!(err.contains("limit"), "{err}");
    let listed: Vec<String> = registry.list().into_iter().map(|a| a.name).collect();
    assert_eq!(listed, ["plates", "vision"]);
    assert!(registry.resident_bytes() > 0);
    assert!(registry.unload("vision").is_some());
    assert!(registry.get("vision").is_none());
    registry.load(&pipeline.model, "third", &dir("lm-qv-r4")).unwrap();
}

#[test]
fn registry_evicts_the_least_recently_used_idle_adapter_and_never_a_pinned_or_held_one() {
    use qwen_ocr_model::adapters::registry::{AdapterRegistry, Residency};
    let pipeline = Pipeline::load(fixtures().join("tiny-tied").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let dir = fixtures().join("adapters/tiny-tied/lm-qv-r4");
    let registry = AdapterRegistry::new(3);
    let load = |name: &str, residency| registry.insert(name, pipeline.load_adapter(name, &dir).unwrap(), residency);
    load("pinned", Residency::Pinned).unwrap();
    load("a", Residency::Evictable).unwrap();
    load("b", Residency::Evictable).unwrap();
    // `a` is used after `b`, so `b` is the least recently used evictable one.
    registry.get("pinned");
    drop(registry.get("a").unwrap());
    assert_eq!(load("c", Residency::Evictable).unwrap().evicted.as_deref(), Some("b"));
    // A request holding `a` keeps it resident even though it is now the least recently used.
    let held_a = registry.get("a").unwrap();
    registry.get("c");
    assert_eq!(load("d", Residency::Evictable).unwrap().evicted.as_deref(), Some("c"));
    // Everything evictable is held: the load is refused and nothing changes.
    let held_d = registry.get("d").unwrap();
    let err = load("e", Residency::Evictable).err().expect("refused").to_string();
    assert!(err.contains("none can be unloaded"), "{err}");
    let names = |r: &AdapterRegistry| r.list().into_iter().map(|a| a.name).collect::<Vec<_>>();
    assert_eq!(names(&registry), ["a", "d", "pinned"]);
    // Once the requests end their adapters can go; the pinned one never does.
    drop((held_a, held_d));
    assert!(load("e", Residency::Evictable).unwrap().evicted.is_some());
    assert!(load("f", Residency::Evictable).unwrap().evicted.is_some());
    assert!(load("g", Residency::Evictable).unwrap().evicted.is_some());
    assert!(names(&registry).contains(&"pinned".to_string()), "{:?}", names(&registry));
}
