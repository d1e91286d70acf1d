//! What can be checked of the deployment files without Docker or a cluster: they parse, the
//! probes answer on a real server, and the limits and grace periods agree with the server's
//! configuration. YAML is read by Python's PyYAML (CI installs it beside `openai`); elsewhere,
//! without it, the YAML test says so and passes, except under `CI`.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The documented configuration, which the images copy to /etc/qwen-ocr/qwen-ocr.toml.
fn config() -> toml::Table {
    std::fs::read_to_string(repository().join("config/qwen-ocr.toml")).unwrap().parse().unwrap()
}

fn config_int(key: &str) -> i64 {
    config()[key].as_integer().unwrap()
}

/// Every document of a YAML file, as JSON; `None` when no Python with PyYAML is at hand.
fn yaml_documents(path: &Path) -> Option<Vec<Value>> {
    let python = std::env::var("QWEN_OCR_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let has_yaml = std::process::Command::new(&python).args(["-c", "import yaml"]).output().is_ok_and(|o| o.status.success());
    if !has_yaml {
        assert!(std::env::var_os("CI").is_none(), "CI must provide PyYAML: set QWEN_OCR_PYTHON to a Python that has it");
        eprintln!("skipped: no `yaml` module for {python}; `pip install pyyaml` and set QWEN_OCR_PYTHON to run it");
        return None;
    }
    let out = std::process::Command::new(&python).args(["-c", script]).arg(path).output().unwrap();
    assert!(out.status.success(), "{} does not parse: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    documents.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

/// "40s" or "1m30s" as seconds.
fn duration_secs(text: &str) -> i64 {
    let (mut total, mut number) = (0, 0);
    for c in text.chars() {
        match c {
            '0'..='9' => number = number * 10 + c.to_digit(10).unwrap() as i64,
            'm' => (total, number) = (total + number * 60, 0),
            's' => (total, number) = (total + number, 0),
            _ => panic!("unexpected duration {text}"),
        }
    }
    total
}

#[test]
fn the_kubernetes_manifests_agree_with_the_server() {
    let Some(documents) = yaml_documents(&repository().join("deploy/k8s/qwen-ocr.yaml")) else { return };
    let deployment = of_kind(&documents, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    // The probes ask a real server for routes that exist, on the port it listens on.
    let port = &container["ports"][0];
    assert_eq!(port["containerPort"].as_i64(), Some(config_int("port")));
    let server = Server::start(&[]);
    let mut paths = Vec::new();
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["port"], port["name"], "{probe} uses the named port");
        let path = get["path"].as_str().unwrap_or_else(|| panic!("{probe} has a path"));
        assert_eq!(server.get(path).0, 200, "{probe} {path}");
        paths.push(path);
    }
    assert_eq!(paths, ["/health", "/health", "/ready"], "liveness must not depend on readiness");

    // Kubernetes waits for preStop and the server's drain before it kills the pod.
    let pre_stop = container["lifecycle"]["preStop"]["exec"]["command"].as_array().unwrap();
    assert_eq!(pre_stop[0], "sleep");
    let pre_stop_secs: i64 = pre_stop[1].as_str().unwrap().parse().unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(grace > pre_stop_secs + config_int("shutdown_grace_secs"), "terminationGracePeriodSeconds {grace}");
    assert!(container["resources"]["requests"]["cpu"].is_string() && container["resources"]["requests"]["memory"].is_string());

    // The shared adapters volume is mounted where the image looks for adapters.
    let dockerfile = std::fs::read_to_string(repository().join("docker/Dockerfile")).unwrap();
    let adapters_dir = dockerfile.split("QWEN_OCR_ADAPTERS_DIR=").nth(1).unwrap().split_whitespace().next().unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mount = mounts.iter().find(|m| m["mountPath"] == adapters_dir).expect("the adapters volume");
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    let claim = volume["persistentVolumeClaim"]["claimName"].as_str().unwrap();
    assert_eq!(of_kind(&documents, "PersistentVolumeClaim")["metadata"]["name"], claim);

    // The Service reaches the pods; the autoscaler scales this Deployment on a metric the
    // server exports.
    let service = of_kind(&documents, "Service");
    assert_eq!(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port["name"]);
    let hpa = of_kind(&documents, "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
    let metric_name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"].as_str().unwrap();
    assert_eq!(metric_name, qwen_ocr_scheduler::metrics::QUEUE_DEPTH);
    assert_eq!(server.post_json("/v1/chat/completions", &chat_body(None, &[], "hi", 2), &[]).0, 200);
    assert!(server.get("/metrics").1.lines().any(|l| l.starts_with(metric_name)), "{metric_name} is exported");

    let Some(adapter_rules) = yaml_documents(&repository().join("deploy/k8s/prometheus-adapter.yaml")) else { return };
    assert_eq!(adapter_rules[0]["rules"]["custom"][0]["name"]["as"], metric_name);
}

#[test]
fn compose_runs_two_replicas_that_share_the_adapters_and_drain_before_being_killed() {
    let Some(documents) = yaml_documents(&repository().join("docker/compose.yaml")) else { return };
    let services = &documents[0]["services"];
    let replicas: Vec<&Value> = ["qwen-ocr-1", "qwen-ocr-2"].iter().map(|name| &services[name]).collect();
    for replica in &replicas {
        let stop = duration_secs(replica["stop_grace_period"].as_str().unwrap());
        assert!(stop > config_int("shutdown_grace_secs"), "stop_grace_period {stop}s");
        assert!(replica["volumes"].as_array().unwrap().iter().any(|v| v.as_str().unwrap().ends_with(":/adapters:ro")));
    }
    let gateway = &services["gateway"];
    let upstreams = gateway["environment"]["QWEN_OCR_REPLICAS"].as_str().unwrap();
    assert_eq!(upstreams, "server qwen-ocr-1:8080; server qwen-ocr-2:8080;");
    let template = gateway["volumes"][0].as_str().unwrap();
    assert!(template.starts_with("./nginx.conf.template:/etc/nginx/templates/"), "{template}");

    // The healthcheck the gateway waits for, run as the container would, against a real server.
    let check = replicas[0]["healthcheck"]["test"].as_array().unwrap();
    let argv: Vec<&str> = check[1..].iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!((check[0].as_str(), argv[0]), (Some("CMD"), "bash"), "dash, the image's sh, has no /dev/tcp");
    let run_against = |port: u16| {
        let script = argv[2].replace("127.0.0.1/8080", &format!("127.0.0.1/{port}"));
        std::process::Command::new(argv[0]).args([argv[1], &script]).output().unwrap().status.success()
    };
    let server = Server::start(&[]);
    let port: u16 = server.base.rsplit(':').next().unwrap().parse().unwrap();
    assert!(run_against(port), "a ready server passes");
    drop(server);
    assert!(!run_against(port), "a stopped one does not");
}

/// The gateway's limits are the server's: a body nginx lets through is one the server reads,
/// and the server's own 504 (JSON, with its reason) comes before nginx gives up.
#[test]
fn the_gateway_limits_agree_with_the_server() {
    let template = std::fs::read_to_string(repository().join("docker/nginx.conf.template")).unwrap();
    let directive = |name: &str| -> String {
        let line = template.lines().map(str::trim).find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}"));
        line[name.len()..].split(';').next().unwrap().trim().to_string()
    };
    let body = directive("client_max_body_size");
    let megabytes: i64 = body.strip_suffix('m').unwrap_or_else(|| panic!("{body} in m")).parse().unwrap();
    assert_eq!(megabytes << 20, config_int("max_body_bytes"));
    let read_timeout = duration_secs(&directive("proxy_read_timeout"));
    assert!(read_timeout > config_int("request_timeout_secs"), "proxy_read_timeout {read_timeout}s");
    assert_eq!(directive("proxy_buffering"), "off", "SSE must not wait in the gateway");
    assert!(directive("proxy_next_upstream").contains("http_503"));
}

/// The fuzz crate (outside the workspace, with its own `Cargo.lock`) resolves to exactly its
/// lock file: `.ci/fuzz-smoke` refuses a stale one (cargo-fuzz itself has no `--locked`), and
/// this finds it sooner, in `cargo test`. Offline when the packages are already here.
#[test]
fn the_fuzz_crates_lock_file_is_current() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = repository().join("fuzz/Cargo.toml");
    let metadata = |offline: bool| {
        let mut command = std::process::Command::new(&cargo);
        command.args(["metadata", "--locked", "--format-version", "1", "--manifest-path"]).arg(&manifest);
        if offline {
            command.arg("--offline");
        }
        command.output().unwrap()
    };
    let mut out = metadata(true);
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("offline") {
        // Some of its packages are not downloaded yet.
        out = metadata(false);
    }
    assert!(out.status.success(), "fuzz/Cargo.lock does not match fuzz/Cargo.toml: {}", String::from_utf8_lossy(&out.stderr));
}
