//! Adapters loaded on first use from `--adapters-dir`, over real HTTP on the tiny checkpoint:
//! served on the first request, loaded once however many ask at the same time, listed before
//! and after, evicted least recently used but never while a request uses them.

mod common;

use std::path::Path;

use common::*;
use qwen_ocr_server::api::adapters::AdapterList;
use qwen_ocr_server::api::chat::ChatCompletion;
use qwen_ocr_server::api::extract::Extraction;
use qwen_ocr_server::api::models::ModelList;
use qwen_ocr_server::api::FinishReason;
use serde_json::{json, Value};

/// An adapters folder: each entry is (name, fixture adapter, optional qwen-ocr.toml text).
fn adapters_folder(entries: &[(&str, &str, Option<&str>)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (name, fixture, profile) in entries {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapter_dir(fixture).join(file), dir.join(file)).unwrap();
        }
        if let Some(text) = profile {
            std::fs::write(dir.join("qwen-ocr.toml"), text).unwrap();
        }
    }
    root
}

fn serve_folder(root: &Path, config: &str) -> Server {
    Server::start_with_config(config, &["--adapters-dir", root.to_str().unwrap()])
}

fn extract(server: &Server, adapter: &str, max_tokens: &str) -> (u16, Value) {
    server.extract_multipart(&[("image", "plate.png", &image_bytes("plate.png"))], &[("max_tokens", max_tokens)], &[("X-Adapter", adapter)])
}

/// `(id, loaded)` of every model `/v1/models` lists.
fn models(server: &Server) -> Vec<(String, bool)> {
    let (_, body) = server.get("/v1/models");
    parse_str::<ModelList>(&body).data.into_iter().map(|m| (m.id, m.loaded)).collect()
}

fn resident(server: &Server) -> Vec<String> {
    let (_, body) = server.get("/v1/adapters");
    parse_str::<AdapterList>(&body).data.into_iter().map(|a| a.name).collect()
}

fn owned(list: &[(&str, bool)]) -> Vec<(String, bool)> {
    list.iter().map(|(n, l)| (n.to_string(), *l)).collect()
}

#[test]
fn an_adapter_in_the_folder_is_served_on_its_first_request_and_loaded_once_however_many_ask() {
    let profile = format!("prompt = {}\n", toml_string(PLATE_PROMPT));
    let root = adapters_folder(&[("plates", "lm-qv-r4", Some(&profile)), ("vision", "vision-merger-pattern", None)]);
    let server = serve_folder(root.path(), "");
    assert_eq!(models(&server), owned(&[("base", true), ("plates", false), ("vision", false)]));
    assert_eq!(metric(&server, "qwen_ocr_adapter_loads_total"), 0.0);

    // Eight requests at once for an adapter nobody loaded: one load, eight answers, each the
    // adapter's tokens for the prompt of its profile (the request has none).
    let expected = generate_text("plate.png", PLATE_PROMPT, 8, Some("lm-qv-r4"));
    std::thread::scope(|s| {
        let requests: Vec<_> = (0..8).map(|_| s.spawn(|| extract(&server, "plates", "8"))).collect();
        for request in requests {
            let (status, body) = request.join().unwrap();
            assert_eq!(status, 200, "{body}");
            let body: Extraction = parse(&body);
            assert_eq!((body.adapter.as_deref(), body.raw.as_str()), (Some("plates"), expected.as_str()));
        }
    });
    assert_eq!(metric(&server, "qwen_ocr_adapter_loads_total"), 1.0);
    assert_eq!(metric(&server, "qwen_ocr_adapter_load_seconds_count"), 1.0);
    assert_eq!(models(&server), owned(&[("base", true), ("plates", true), ("vision", false)]));

    // Naming it as the chat `model` loads it too.
    let (status, body) = server.post_json("/v1/chat/completions", &chat_body(Some("vision"), &["plate.png"], PLATE_PROMPT, 6), &[]);
    assert_eq!(status, 200, "{body}");
    let body: ChatCompletion = parse(&body);
    assert_eq!(body.choices[0].message.content, generate_text("plate.png", PLATE_PROMPT, 6, Some("vision-merger-pattern")));
    assert_eq!(metric(&server, "qwen_ocr_adapter_loads_total"), 2.0);
    assert_eq!(resident(&server), ["plates", "vision"]);
    assert_eq!(metric(&server, "qwen_ocr_adapter_evictions_total"), 0.0);
}

#[test]
fn names_that_leave_the_folder_and_broken_folders_get_json_errors() {
    let root = adapters_folder(&[
        ("pathy", "lm-qv-r4", Some("path = \"/etc\"\n")),
        ("typo", "lm-qv-r4", Some("promt = \"x\"\n")),
        ("ok", "lm-qv-r4", None),
    ]);
    std::fs::create_dir(root.path().join("corrupt")).unwrap();
    std::fs::write(root.path().join("corrupt/adapter_config.json"), "{ not json").unwrap();
    // A symlink to an adapter outside the folder is not part of it.
    std::os::unix::fs::symlink(adapter_dir("lm-qv-r4"), root.path().join("escape")).unwrap();
    let server = serve_folder(root.path(), "");

    assert_api_error(&extract(&server, "../lm-qv-r4", "2"), 400, "invalid_adapter_name");
    assert_api_error(&extract(&server, "acme/plates", "2"), 400, "invalid_adapter_name");
    assert_api_error(&extract(&server, "..", "2"), 403, "adapter_path_outside");
    assert_api_error(&extract(&server, "escape", "2"), 403, "adapter_path_outside");
    assert_api_error(&extract(&server, ".", "2"), 404, "adapter_not_found");
    assert_api_error(&extract(&server, "missing", "2"), 404, "adapter_not_found");
    assert_api_error(&extract(&server, "pathy", "2"), 400, "invalid_adapter_profile");
    assert_api_error(&extract(&server, "typo", "2"), 400, "invalid_adapter_profile");
    assert_api_error(&extract(&server, "corrupt", "2"), 400, "invalid_adapter");
    let chat = server.post_json("/v1/chat/completions", &chat_body(Some("../../etc"), &[], "hi", 2), &[]);
    assert_api_error(&chat, 400, "invalid_adapter_name");

    let listed: Vec<String> = models(&server).into_iter().map(|(id, _)| id).collect();
    assert_eq!(listed, ["base", "corrupt", "ok", "pathy", "typo"], "symlinks out of the folder are not listed");
    assert_eq!(extract(&server, "ok", "2").0, 200, "the server carries on");
    assert_eq!(resident(&server), ["ok"]);
}

#[test]
fn the_least_recently_used_idle_adapter_is_evicted_never_one_in_use() {
    let root = adapters_folder(&[("a", "lm-qv-r4", None), ("b", "lm-qv-r4", None), ("c", "vision-merger-pattern", None)]);
    // Streams long enough (tens of seconds) to stay in flight until the test drops them.
    let server = serve_folder(root.path(), "max_adapters = 2\nmax_tokens_limit = 20000\n");
    let long = |adapter: &str| chat_body(Some(adapter), &["plate.png"], PLATE_PROMPT, 20000);

    // `a` is the least recently used when `c` needs room, but a request is using it: `b` goes.
    let stream_a = server.open_stream(&long("a"), &[]);
    assert_eq!(extract(&server, "b", "2").0, 200);
    assert_eq!(extract(&server, "c", "2").0, 200);
    assert_eq!(resident(&server), ["a", "c"]);
    assert_eq!(metric(&server, "qwen_ocr_adapter_evictions_total"), 1.0);

    // Every slot in use: a third adapter waits its turn (503, retry) instead of evicting one.
    let stream_c = server.open_stream(&long("c"), &[]);
    let busy = server.call("POST", "/v1/chat/completions", &[("content-type", "application/json")], Some(long("b").to_string().as_bytes()));
    assert_api_error(&(busy.status, busy.json()), 503, "adapters_full");
    assert_eq!(resident(&server), ["a", "c"]);

    // The requests end (their clients hang up); now the least recently used, `a`, makes room.
    drop(stream_a);
    drop(stream_c);
    wait_idle(&server);
    assert_eq!(extract(&server, "c", "2").0, 200);
    assert_eq!(extract(&server, "b", "2").0, 200);
    assert_eq!(resident(&server), ["b", "c"]);
    assert_eq!(metric(&server, "qwen_ocr_adapter_evictions_total"), 2.0);
    assert_eq!(metric(&server, "qwen_ocr_adapter_loads_total"), 4.0, "a, b, c, then b again");
}

#[test]
fn configured_adapters_stay_when_the_folder_fills_the_slots() {
    let root = adapters_folder(&[("a", "lm-qv-r4", None), ("b", "lm-qv-r4", None)]);
    let pinned = format!("pinned={}", adapter_dir("vision-merger-pattern").display());
    let server = Server::start_with_config("max_adapters = 2\n", &["--adapters-dir", root.path().to_str().unwrap(), "--adapter", &pinned]);
    assert_eq!(extract(&server, "a", "2").0, 200);
    assert_eq!(extract(&server, "b", "2").0, 200);
    assert_eq!(resident(&server), ["b", "pinned"], "`a` made room; the configured adapter is never evicted");
    assert_eq!(extract(&server, "pinned", "2").0, 200);
}

/// `org/repo` names come from the hub when `hub_adapters` allows it; offline, from the cache
/// (laid out here as hf-hub writes it).
#[test]
fn hub_adapters_load_from_the_hub_cache_when_allowed() {
    let hf_home = tempfile::tempdir().unwrap();
    let profile = hf_home.path().join("qwen-ocr.toml");
    std::fs::write(&profile, format!("prompt = {}\n", toml_string(PLATE_PROMPT))).unwrap();
    let weights = ["adapter_config.json", "adapter_model.safetensors"].map(|f| adapter_dir("lm-qv-r4").join(f));
    hub_cache(hf_home.path(), "acme/plates", &[&weights[..], &[profile]].concat());
    let config = tempfile::tempdir().unwrap();
    let file = config.path().join("qwen-ocr.toml");
    std::fs::write(&file, "hub_adapters = true\n").unwrap();
    let server = Server::start_with_env(&["--config", file.to_str().unwrap()], &[("HF_HOME", hf_home.path().to_str().unwrap())]);

    let (status, body) = extract(&server, "acme/plates", "8");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        parse::<Extraction>(&body).raw,
        generate_text("plate.png", PLATE_PROMPT, 8, Some("lm-qv-r4")),
        "its weights and its profile's prompt"
    );
    assert_eq!(resident(&server), ["acme/plates"]);
    assert_api_error(&extract(&server, "acme/missing", "2"), 404, "adapter_not_found");
    assert_api_error(&extract(&server, "../plates", "2"), 400, "invalid_adapter_name");
    assert_api_error(&extract(&server, "acme/..", "2"), 400, "invalid_adapter_name");
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// An adapter loaded on first use brings its folder's extraction profile, schema included (its
/// `schema_file` resolved against that folder): an image and `X-Adapter` alone give fields
/// that validate, with confidences.
#[test]
fn an_adapter_loaded_on_first_use_answers_with_its_folders_profile_schema() {
    let schema = json!({
        "type": "object",
        "properties": { "Engine No": { "type": "string", "maxLength": 8 }, "Model": { "enum": ["A", "B"] } },
        "required": ["Engine No", "Model"],
        "additionalProperties": false
    });
    let root = adapters_folder(&[("plates", "lm-qv-r4", Some("schema_file = \"schema.json\"\nmax_tokens = 64\n"))]);
    std::fs::write(root.path().join("plates/schema.json"), schema.to_string()).unwrap();
    let server = serve_folder(root.path(), "");
    let (status, body) = server.extract_multipart(&[("image", "plate.png", &image_bytes("plate.png"))], &[], &[("X-Adapter", "plates")]);
    assert_eq!(status, 200, "{body}");
    let extraction: Extraction = parse(&body);
    assert_eq!(extraction.finish_reason, FinishReason::Stop, "{body}");
    common::json_schema::validate(&extraction.data, &schema).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let confidence = extraction.confidence.unwrap_or_else(|| panic!("no confidence: {body}"));
    assert_eq!(confidence.len(), 2, "{body}");
    assert_eq!(resident(&server), ["plates"]);
}

/// `qwen-ocr serve` with `toml` as its configuration: it must fail before listening, with one
/// error line that mentions every one of `names`.
fn assert_refused_at_start(toml: &str, names: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, toml).unwrap();
    let out = qwen_ocr(&["serve", "--model", &tiny_model(), "--host", "127.0.0.1", "--port", "0", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !stderr.contains("listening"), "{stderr}");
    for name in names {
        assert!(stderr.contains(name), "`{name}` not named: {stderr}");
    }
}

/// Profile values are checked wherever a profile is loaded, and a bad one is reported as the
/// operator's mistake, naming the adapter and the field: the start stops before the server
/// listens, and a runtime or first-use load fails with 400 and loads nothing. A value of the
/// wrong type is an error too, never a default.
#[test]
fn bad_profile_values_stop_the_start_or_fail_the_load_naming_the_adapter_and_the_field() {
    let path = toml_string(&adapter_dir("lm-qv-r4").display().to_string());
    let plates = |settings: &str| format!("[adapters.plates]\npath = {path}\n{settings}");
    assert_refused_at_start(
        &plates("min_pixels = 200000\nmax_pixels = 100000\n"),
        &["adapter `plates`", "min_pixels 200000 exceeds max_pixels 100000"],
    );
    assert_refused_at_start(&plates("temperature = -0.5\n"), &["adapter `plates`", "temperature"]);
    assert_refused_at_start(&plates("max_tokens = 0\n"), &["adapter `plates`", "max_tokens"]);
    assert_refused_at_start(&plates("max_tokens = \"many\"\n"), &["max_tokens", "many"]);
    assert_refused_at_start(&plates("max_pixels = 99999999\n"), &["adapter `plates`", "max_pixels 99999999 is over 16777216"]);
    assert_refused_at_start("min_pixels = 5000\nmax_pixels = 100\n", &["min_pixels 5000 exceeds max_pixels 100"]);
    assert_refused_at_start("dtype = \"f64\"\n", &["dtype", "f64"]);
    assert_refused_at_start(
        "allowed_image_hosts = [\"https://images.example.com\"]\n",
        &["allowed_image_hosts", "https://images.example.com"],
    );
    assert_refused_at_start("[engine]\nmax_queue = 0\n", &["engine.max_queue"]);

    let root = adapters_folder(&[
        ("plates", "lm-qv-r4", None),
        ("typed", "lm-qv-r4", Some("max_tokens = \"many\"\n")),
        ("cold", "lm-qv-r4", Some("temperature = -1.0\n")),
        ("narrow", "lm-qv-r4", Some("min_pixels = 5000\nmax_pixels = 100\n")),
    ]);
    let server = serve_folder(root.path(), "max_tokens_limit = 64\n");
    let refused = |reply: (u16, Value), code: &str, names: &[&str]| {
        assert_api_error(&reply, 400, code);
        let message = reply.1["error"]["message"].as_str().unwrap().to_string();
        for name in names {
            assert!(message.contains(name), "`{name}` not named: {message}");
        }
    };
    let load = |extra: Value| {
        let mut body = json!({ "name": "plates", "path": "plates" });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        server.post_json("/v1/adapters", &body, &[])
    };
    let in_profile = "invalid_profile";
    refused(load(json!({ "min_pixels": 200000, "max_pixels": 100000 })), in_profile, &["adapter `plates`", "min_pixels 200000 exceeds"]);
    refused(
        load(json!({ "max_tokens": 65 })),
        in_profile,
        &["adapter `plates`", "max_tokens 65 is over the server's max_tokens_limit (64)"],
    );
    refused(load(json!({ "temperature": -0.5 })), in_profile, &["adapter `plates`", "temperature"]);
    refused(load(json!({ "max_pixels": 99999999 })), in_profile, &["adapter `plates`", "max_pixels"]);
    // Under the largest cap of any family but over this checkpoint's (Qwen2-VL: 28-px tokens).
    refused(load(json!({ "max_pixels": 14000000 })), in_profile, &["adapter `plates`", "max_pixels must be between 784 and 12845056"]);
    refused(load(json!({ "max_tokens": "many" })), "invalid_json", &["max_tokens"]);
    assert_eq!(resident(&server), Vec::<String>::new(), "a refused profile loads nothing");

    refused(extract(&server, "typed", "2"), "invalid_adapter_profile", &["max_tokens", "many"]);
    refused(extract(&server, "cold", "2"), in_profile, &["adapter `cold`", "temperature"]);
    refused(extract(&server, "narrow", "2"), in_profile, &["adapter `narrow`", "min_pixels 5000 exceeds max_pixels 100"]);
    assert_eq!(resident(&server), Vec::<String>::new());
    assert_eq!(load(json!({ "max_tokens": 64, "max_pixels": 200000 })).0, 201, "good values load");
}
