//! The HTTP contract: `GET /openapi.json` is a valid OpenAPI 3.1 document listing every route,
//! and schemathesis, driven by it against a real server on the tiny checkpoint, finds no 5xx
//! and no response (status, content type or body) that the document does not describe.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

/// Every route the server serves, as (method, path): the document must list exactly these.
const ROUTES: [(&str, &str); 10] = [
    ("post", "/v1/extract"),
    ("post", "/v1/chat/completions"),
    ("get", "/v1/models"),
    ("get", "/v1/adapters"),
    ("post", "/v1/adapters"),
    ("delete", "/v1/adapters/{name}"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// The Python with the contract tools (CI's venv has them); `None`, after saying so, where they
/// are missing outside CI.
fn python_with(module: &str, package: &str) -> Option<String> {
    let python = std::env::var("QWEN_OCR_PYTHON").unwrap_or_else(|_| "python3".into());
    let has = Command::new(&python).args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success());
    if !has {
        assert!(std::env::var_os("CI").is_none(), "CI must provide {package}: set QWEN_OCR_PYTHON to a Python that has it");
        eprintln!("skipped: no `{package}` for {python}; `pip install {package}` and set QWEN_OCR_PYTHON to run it");
        return None;
    }
    Some(python)
}

#[test]
fn openapi_json_is_a_valid_openapi_3_1_document_listing_every_route_with_its_errors_and_auth() {
    let server = Server::start_with_config("max_tokens_limit = 48\n", &[]);
    let (status, text) = server.get("/openapi.json");
    assert_eq!(status, 200, "{text}");
    let doc: Value = parse_str(&text);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "{}", doc["openapi"]);

    let listed: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().filter(|k| *k != "parameters").map(|m| (m.clone(), path.clone())))
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(listed, served);
    for (method, path) in ROUTES {
        // Each listed route is really served (the fallback answers `unknown_route`).
        let concrete = path.replace("{name}", "nope");
        let reply = server.call(&method.to_ascii_uppercase(), &concrete, &[], None);
        let code = serde_json::from_str::<Value>(&reply.body).ok().map(|b| b["error"]["code"].clone());
        assert_ne!(code, Some(Value::from("unknown_route")), "{method} {path} is not served");

        let operation = &doc["paths"][path][method];
        let responses = operation["responses"].as_object().unwrap();
        for status in ["408", "413", "500", "503"] {
            assert!(responses.contains_key(status), "{method} {path} lacks {status}");
        }
        let authenticated = path.starts_with("/v1/");
        assert_eq!(responses.contains_key("401"), authenticated, "{method} {path}");
        assert_eq!(operation["security"][0].get("bearer").is_some(), authenticated, "{method} {path}");
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    // The configured limit bounds `max_tokens` wherever a request sets it.
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["maximum"], 48);
    let extract = &doc["paths"]["/v1/extract"]["post"];
    let query = extract["parameters"].as_array().unwrap().iter().find(|p| p["name"] == "max_tokens").unwrap();
    assert_eq!(query["schema"]["maximum"], 48);
    assert!(extract["parameters"].as_array().unwrap().iter().any(|p| p["name"] == "X-Adapter" && p["in"] == "header"));
    let media: BTreeSet<&str> = extract["requestBody"]["content"].as_object().unwrap().keys().map(String::as_str).collect();
    assert!(media.contains("multipart/form-data") && media.contains("image/png"), "{media:?}");
    let chat = &doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"];
    assert!(chat.get("application/json").is_some() && chat.get("text/event-stream").is_some(), "{chat}");

    let Some(python) = python_with("openapi_spec_validator", "openapi-spec-validator") else { return };
    let check = "import json, sys\n\
        from openapi_spec_validator import OpenAPIV31SpecValidator, validate\n\
        validate(json.load(sys.stdin), cls=OpenAPIV31SpecValidator)\n";
    let mut child =
        Command::new(&python).args(["-c", check]).stdin(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not a valid OpenAPI 3.1 document: {}", String::from_utf8_lossy(&out.stderr));
}

/// schemathesis generates requests from `/openapi.json` (valid ones and broken ones) and
/// checks every answer against the document. Bounded: few examples per route, a small
/// `max_tokens_limit` (which the document states as the field's maximum) and a time budget.
///
/// The server has an adapters folder holding a real adapter, so the adapter routes answer
/// 2xx too: loads, lists and unloads, chained through the document's links (an adapter loaded
/// by `POST /v1/adapters` is then listed and unloaded by name). The document given to
/// schemathesis narrows `path` to that adapter's folder and names it as the example, so that
/// generated loads can succeed; everything else is the server's own document.
#[test]
fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let Some(python) = python_with("schemathesis", "schemathesis") else { return };
    let adapters = tempfile::tempdir().unwrap();
    let folder = adapters.path().join(ADAPTER);
    std::fs::create_dir(&folder).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter_dir("lm-qv-r4").join(file), folder.join(file)).unwrap();
    }
    // Every generated load pins an adapter: room for all of them, so none is refused 503.
    let config = "max_tokens_limit = 4\nmax_adapters = 100000\n";
    let server = Server::start_with_config(config, &["--adapters-dir", adapters.path().to_str().unwrap()]);
    let mut doc: Value = parse_str(&server.get("/openapi.json").1);
    let request = &mut doc["components"]["schemas"]["LoadAdapterRequest"];
    request["properties"]["path"]["enum"] = json!([ADAPTER]);
    request["examples"] = json!([{ "name": ADAPTER, "path": ADAPTER }]);
    let links = &doc["paths"]["/v1/adapters"]["post"]["responses"]["201"]["links"];
    assert_eq!((&links["unload"]["operationId"], &links["list"]["operationId"]), (&json!("unload_adapter"), &json!("list_adapters")));
    let document = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(document.path(), doc.to_string()).unwrap();

    let phases = "examples,coverage,fuzzing,stateful";
    schemathesis(&python, document.path().to_str().unwrap(), &server, &["--phases", phases, "--max-examples", "30", "--max-time", "120"]);
    assert!(answered(&server, "/v1/adapters", "201") > 0.0, "no adapter was ever loaded:\n{}", server.logs());
    assert!(answered(&server, "/v1/adapters", "200") > 0.0, "the adapters were never listed");
    assert!(answered(&server, "/v1/adapters/{name}", "200") > 0.0, "no adapter was ever unloaded:\n{}", server.logs());
    assert!(!server.logs().contains("panicked"), "{}", server.logs());

    // Without an adapters folder, runtime loading is refused (403): those answers too.
    let server = Server::start_with_config("max_tokens_limit = 4\n", &[]);
    let url = server.url("/openapi.json");
    let only_adapters = ["--include-path-regex", "^/v1/adapters", "--phases", "examples,coverage,fuzzing", "--max-examples", "10"];
    schemathesis(&python, &url, &server, &[&only_adapters[..], &["--max-time", "20"]].concat());
    assert!(answered(&server, "/v1/adapters", "403") > 0.0, "POST /v1/adapters was never refused");
    assert!(!server.logs().contains("panicked"), "{}", server.logs());
}

/// The adapter the contract run's folder holds.
const ADAPTER: &str = "plates";

/// Runs schemathesis from `document` (a URL or a file) against `server`, with our checks.
fn schemathesis(python: &str, document: &str, server: &Server, extra: &[&str]) {
    let report = tempfile::tempdir().unwrap();
    let out = Command::new(python)
        .args(["-m", "schemathesis.cli", "run", document, "--url", &server.base])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
        .args(["--seed", "11", "--workers", "1", "--request-timeout", "60", "--suppress-health-check", "all"])
        .args(extra)
        .arg("--report-dir")
        .arg(report.path())
        .current_dir(report.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis found problems:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // What it covered (scenarios, links, phases, test cases), for `--nocapture`.
    let links = stdout.lines().filter(|l| l.contains("Scenarios:") || l.contains("API Links:")).collect::<Vec<_>>().join("\n");
    eprintln!("{links}\n{}", stdout.rsplit("SUMMARY").next().unwrap_or(&stdout));
}

/// How many times the server answered `route` with `status`, by its metrics.
fn answered(server: &Server, route: &str, status: &str) -> f64 {
    let (_, text) = server.get("/metrics");
    let (route, status) = (format!("route=\"{route}\""), format!("status=\"{status}\""));
    let series = |l: &&str| l.starts_with("qwen_ocr_http_requests_total{") && l.contains(&route) && l.contains(&status);
    text.lines().filter(series).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}
