//! The project's own gateway, `docker/nginx.conf.template`, run for real: Debian's nginx in
//! front of two `qwen-ocr serve` replicas on loopback ports that share one adapters folder.
//! CI installs nginx (`.ci/run`); elsewhere, without nginx, the tests say so and pass, except
//! under `CI`.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use qwen_ocr_server::api::chat::ChatCompletionChunk;
use qwen_ocr_server::api::error::{ErrorKind, ErrorResponse};
use qwen_ocr_server::api::extract::Extraction;
use qwen_ocr_server::api::models::ModelList;
use qwen_ocr_server::api::FinishReason;
use qwen_ocr_server::config::ServerConfig;
use serde_json::{json, Value};

const ADAPTERS: [&str; 4] = ["lm-qv-r4", "lm-qv-r4-old-layout", "lm-all-rslora-regex", "vision-merger-pattern"];

/// nginx running the gateway configuration, rendered for loopback ports.
struct Gateway {
    nginx: Child,
    endpoint: Endpoint,
    dir: tempfile::TempDir,
}

impl std::ops::Deref for Gateway {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Gateway {
    /// The gateway in front of `replicas`, or `None` (outside CI) when there is no nginx.
    fn start(replicas: &[&Server]) -> Option<Self> {
        let addresses: Vec<&str> = replicas.iter().map(|r| r.base.trim_start_matches("http://")).collect();
        Self::start_with(&addresses, |site| site)
    }

    /// The gateway in front of `upstreams` (host:port), its configuration passed through `edit`.
    fn start_with(upstreams: &[&str], edit: impl Fn(String) -> String) -> Option<Self> {
        let Some(binary) = nginx_binary() else {
            assert!(std::env::var_os("CI").is_none(), "CI must provide nginx (.ci/run installs Debian's nginx-light)");
            eprintln!("skipped: no nginx found (apt-get install nginx-light, or set QWEN_OCR_NGINX)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let servers: String = upstreams.iter().map(|address| format!("server {address};")).collect();
        let template = std::fs::read_to_string(repository().join("docker/nginx.conf.template")).unwrap();
        let site =
            edit(template.replace("${QWEN_OCR_GATEWAY_LISTEN}", &format!("127.0.0.1:{port}")).replace("${QWEN_OCR_REPLICAS}", &servers));
        assert!(!site.contains("${"), "a placeholder the test does not know: {site}");
        std::fs::write(dir.path().join("qwen-ocr.conf"), site).unwrap();
        std::fs::write(dir.path().join("nginx.conf"), main_config(dir.path())).unwrap();
        let nginx = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut gateway = Gateway { nginx, endpoint: Endpoint { base: format!("http://127.0.0.1:{port}") }, dir };
        gateway.wait_up();
        Some(gateway)
    }

    fn wait_up(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.nginx.try_wait().unwrap() {
                panic!("nginx exited ({status}): {}", self.error_log());
            }
            let port = self.base.rsplit(':').next().unwrap().parse::<u16>().unwrap();
            // Listening is enough: the master binds before its workers accept.
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the gateway never answered: {}", self.error_log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master process then stops its workers too.
        let _ = Command::new("kill").args(["-TERM", &self.nginx.id().to_string()]).status();
        let started = Instant::now();
        while self.nginx.try_wait().ok().flatten().is_none() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.nginx.kill();
        let _ = self.nginx.wait();
    }
}

/// The main context the site file is included from; everything nginx writes stays in `dir`.
fn main_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         # As root, workers would otherwise run as nobody and could not use the temp dirs.\nuser root;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         include {d}/qwen-ocr.conf;\n}}\n"
    )
}

fn nginx_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("QWEN_OCR_NGINX") {
        return Some(path.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Debian installs it in /usr/sbin, which a non-root PATH often lacks.
    std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin")]).map(|d| d.join("nginx")).find(|p| p.is_file())
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn replica(id: &str) -> Server {
    let shared = fixtures().join("adapters/tiny-tied");
    Server::start(&["--adapters-dir", shared.to_str().unwrap(), "--replica-id", id])
}

/// `POST /v1/extract` with the image as the body, optionally naming an adapter.
fn extract(endpoint: &Endpoint, adapter: Option<&str>, max_tokens: usize) -> Reply {
    let mut headers = vec![("content-type", "image/png")];
    headers.extend(adapter.map(|a| ("x-adapter", a)));
    endpoint.call("POST", &format!("/v1/extract?max_tokens={max_tokens}"), &headers, Some(&image_bytes("plate.png")))
}

#[test]
fn the_gateway_keeps_each_adapter_on_one_replica_streams_and_answers_its_own_errors_in_json() {
    let (a, b) = (replica("replica-a"), replica("replica-b"));
    let Some(gateway) = Gateway::start(&[&a, &b]) else { return };

    // The same X-Adapter lands on the same replica every time, which loads it there only.
    let mut home = HashMap::new();
    let mut text = HashMap::new();
    for adapter in ADAPTERS {
        let replies: Vec<Reply> = (0..4).map(|_| extract(&gateway, Some(adapter), 6)).collect();
        assert!(replies.iter().all(|r| r.status == 200), "{}", replies[0].body);
        let replicas: HashSet<_> = replies.iter().map(|r| r.replica.clone().unwrap()).collect();
        assert_eq!(replicas.len(), 1, "{adapter} went to {replicas:?}");
        home.insert(adapter, replies[0].replica.clone().unwrap());
        text.insert(adapter, parse::<Extraction>(&replies[0].json()).raw);
    }
    let loads = |s: &Server| metric(s, "qwen_ocr_adapter_loads_total");
    assert_eq!(loads(&a) + loads(&b), ADAPTERS.len() as f64, "each adapter loaded once, on its replica");

    // Requests without an adapter are spread over both replicas.
    let spread: HashSet<_> = (0..24).map(|_| extract(&gateway, None, 1).replica.unwrap()).collect();
    assert_eq!(spread, HashSet::from(["replica-a".to_string(), "replica-b".to_string()]));

    // Yet every replica serves every adapter of the shared folder, with the same result.
    for server in [&a, &b] {
        for adapter in ADAPTERS {
            let reply = extract(server, Some(adapter), 6);
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_eq!(parse::<Extraction>(&reply.json()).raw, text[adapter], "{adapter} on {:?}", reply.replica);
        }
    }

    // The path form picks the adapter for clients that cannot send headers, routed the same.
    let reply = gateway.call(
        "POST",
        "/adapters/lm-qv-r4/v1/extract?max_tokens=6",
        &[("content-type", "image/png")],
        Some(&image_bytes("plate.png")),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let adapter = parse::<Extraction>(&reply.json()).adapter;
    assert_eq!((adapter.as_deref(), &reply.replica), (Some("lm-qv-r4"), &Some(home["lm-qv-r4"].clone())));

    // The client's request id reaches the replica's logs and comes back.
    let reply = gateway.call("GET", "/v1/models", &[("x-request-id", "through-the-gateway-7")], None);
    assert_eq!(reply.request_id.as_deref(), Some("through-the-gateway-7"));
    let models = parse::<ModelList>(&reply.json()).data;
    assert_eq!(models.len(), 1 + ADAPTERS.len(), "base and every adapter of the folder: {models:?}");
    let logged = || a.logs().contains("through-the-gateway-7") || b.logs().contains("through-the-gateway-7");
    let started = Instant::now();
    while !logged() {
        // The log lines reach the test through a pipe, a moment after the response.
        assert!(started.elapsed() < Duration::from_secs(5), "the replica never logged the request id");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A streamed chat comes through whole: every token's chunk, then [DONE] (that each chunk
    // is passed on as it comes is shown deterministically by the test with a held stream).
    let stream = gateway.open_stream(&chat_body(None, &["plate.png"], PLATE_PROMPT, 300), &[]);
    let rest = stream.finish();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    assert!(rest.len() >= 300, "{} chunks", rest.len());

    // A body over the limit is refused by the gateway itself, in the API's JSON.
    assert_raw_api_error(&oversized_post(&gateway), 413, "body_too_large");
}

/// A replica that answers 503 (model still loading, or draining) is skipped: the request,
/// a POST with its body, is answered by the next one.
#[test]
fn a_replica_answering_503_is_skipped_for_the_next_one() {
    let loading = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = loading.local_addr().unwrap().to_string();
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = refused.clone();
    std::thread::spawn(move || {
        for mut socket in loading.incoming().map_while(Result::ok) {
            answer_503(&mut socket);
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let ready = replica("ready");
    let ready_address = ready.base.trim_start_matches("http://").to_string();
    let Some(gateway) = Gateway::start_with(&[&address, &ready_address], |site| site) else { return };
    for _ in 0..12 {
        let reply = extract(&gateway, None, 1);
        assert_eq!((reply.status, reply.replica.as_deref()), (200, Some("ready")), "{}", reply.body);
    }
    assert!(refused.load(Ordering::Relaxed) > 0, "the loading replica was tried");
}

/// SSE events reach the client as the replica sends them: the upstream here sends one event
/// and holds the rest until the client has received it.
#[test]
fn a_stream_passes_each_event_as_the_replica_sends_it() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = upstream.local_addr().unwrap().to_string();
    let (received_tx, received_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut socket, _) = upstream.accept().unwrap();
        if !read_request(&mut socket) {
            return;
        }
        let chunk = |text: &str| format!("{:x}\r\n{text}\r\n", text.len());
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        socket.write_all(format!("{head}{}", chunk("data: {\"n\": 1}\n\n")).as_bytes()).unwrap();
        // Held until the client has the first event; a buffering gateway would never deliver it.
        let _ = received_rx.recv_timeout(Duration::from_secs(20));
        socket.write_all(format!("{}{}0\r\n\r\n", chunk("data: {\"n\": 2}\n\n"), chunk("data: [DONE]\n\n")).as_bytes()).unwrap();
    });
    let Some(gateway) = Gateway::start_with(&[&address], |site| site) else { return };
    let response = ureq::post(&gateway.url("/v1/chat/completions")).timeout(Duration::from_secs(10)).send_string("{}").unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(response.into_reader())).map_while(Result::ok);
    assert_eq!(lines.next().as_deref(), Some(r#"data: {"n": 1}"#), "the first event, while the rest is held");
    received_tx.send(()).unwrap();
    let rest: Vec<String> = lines.filter(|l| !l.is_empty()).collect();
    assert_eq!(rest, [r#"data: {"n": 2}"#, "data: [DONE]"]);
}

/// Answers one request as a replica that is still loading its model does.
fn answer_503(socket: &mut TcpStream) {
    if !read_request(socket) {
        return;
    }
    let body = r#"{"error":{"message":"the model is still loading","type":"server_error","code":"unavailable","param":null}}"#;
    let _ = write!(
        socket,
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Reads one request: its headers, then the body its Content-Length announces. False when the
/// connection ends first.
fn read_request(socket: &mut TcpStream) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 65536];
    let body_start = loop {
        let n = socket.read(&mut buf).unwrap_or(0);
        if n == 0 {
            return false;
        }
        seen.extend_from_slice(&buf[..n]);
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&seen[..body_start]).to_ascii_lowercase();
    let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
    while seen.len() < body_start + length {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// Announces a body one byte over max_body_bytes; nginx answers from the headers alone.
fn oversized_post(gateway: &Gateway) -> String {
    let length = (20 << 20) + 1;
    raw_exchange(
        gateway,
        &format!("POST /v1/extract HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n\r\n"),
    )
}

/// Writes `request` as it is and reads the whole reply.
fn raw_exchange(gateway: &Gateway, request: &str) -> String {
    let mut socket = TcpStream::connect(gateway.base.trim_start_matches("http://")).unwrap();
    socket.write_all(request.as_bytes()).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = String::new();
    let _ = socket.read_to_string(&mut reply);
    reply
}

/// The body of a raw reply, checked to be in the API's error shape with this status.
fn assert_raw_api_error(reply: &str, status: u16, code: &str) {
    assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("content-type: application/json"), "{reply}");
    let body: Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap().trim()).unwrap();
    assert_gateway_error(&(status, body), status, code);
}

/// An error nginx wrote itself: the server's `ErrorResponse`, its code an `ErrorKind` with
/// the status and `type` the server would give it.
fn assert_gateway_error((got, body): &(u16, Value), status: u16, code: &str) {
    assert_eq!(*got, status, "{body}");
    let error =
        serde_json::from_value::<ErrorResponse>(body.clone()).unwrap_or_else(|e| panic!("not an ErrorResponse ({e}): {body}")).error;
    assert!(!error.message.is_empty(), "{body}");
    assert_eq!((error.code.to_string().as_str(), error.param), (code, None), "{body}");
    assert_eq!((error.code.status().as_u16(), error.error_type), (status, error.code.error_type()), "{body}");
}

/// Every JSON error the gateway writes itself (each `return` of an error location) has a
/// `code` the OpenAPI document lists in `ErrorKind`, with the status and `type` the server
/// gives that code, and a `Retry-After` where the server would send one. Read from the file,
/// so it holds without nginx installed.
#[test]
fn the_gateways_own_error_codes_are_in_the_openapi_document() {
    let template = std::fs::read_to_string(repository().join("docker/nginx.conf.template")).unwrap();
    let document = serde_json::to_value(qwen_ocr_server::routes::document(&ServerConfig::default())).unwrap();
    let documented: HashSet<&str> =
        document["components"]["schemas"]["ErrorKind"]["enum"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let mut checked = Vec::new();
    for location in template.split("location = /.gateway-errors/").skip(1) {
        let block = &location[..location.find("\n    }").unwrap()];
        let status: u16 = block[..3].parse().unwrap();
        assert!(template.contains(&format!("error_page {status} /.gateway-errors/{status};")), "{status} is never used");
        let body = block.split("return ").nth(1).unwrap();
        assert!(body.starts_with(&format!("{status} '")), "{block}");
        let json = body[4..].trim_start_matches('\'').split("\\n'").next().unwrap();
        let reply: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{status}: {e}: {json}"));
        let code = reply["error"]["code"].as_str().unwrap();
        assert!(documented.contains(code), "{status}: `{code}` is not in the document's ErrorKind");
        assert_gateway_error(&(status, reply.clone()), status, code);
        let kind = serde_json::from_value::<ErrorKind>(json!(code)).unwrap();
        assert_eq!(block.contains("Retry-After"), kind.retry_after().is_some(), "{status}: Retry-After as the server sends it");
        checked.push(status);
    }
    checked.sort();
    assert_eq!(checked, [400, 404, 413, 500, 502, 504]);
}

/// nginx's own 504, 400 and 404 are the API's JSON too. The upstream here accepts connections and
/// never answers; the test shortens the read timeout (310 s in the file) to one second.
#[test]
fn the_gateways_own_timeouts_and_bad_requests_are_json() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let shorten = |site: String| {
        assert!(site.contains("proxy_read_timeout 310s;"));
        site.replace("proxy_read_timeout 310s;", "proxy_read_timeout 1s;")
    };
    let Some(gateway) = Gateway::start_with(&[&address], shorten) else { return };
    let reply = gateway.call("GET", "/v1/models", &[("x-request-id", "slow-1")], None);
    assert_gateway_error(&(reply.status, reply.json()), 504, "timeout");
    assert_eq!(reply.request_id.as_deref(), Some("slow-1"));
    assert_raw_api_error(&raw_exchange(&gateway, "NOT A REQUEST\r\n\r\n"), 400, "invalid_request");
    let reply = gateway.call("GET", "/.gateway-errors/502", &[], None);
    assert_gateway_error(&(reply.status, reply.json()), 404, "unknown_route");
}

#[test]
fn sigterm_to_one_replica_during_traffic_loses_no_request() {
    let (mut a, b) = (replica("replica-a"), replica("replica-b"));
    let Some(gateway) = Gateway::start(&[&a, &b]) else { return };
    let done = AtomicBool::new(false);
    let terminated = AtomicBool::new(false);
    // (status, replica, sent after the SIGTERM, body)
    let results = Mutex::new(Vec::<(u16, Option<String>, bool, String)>::new());
    let count =
        |replica: &str, after: bool| results.lock().unwrap().iter().filter(|r| r.1.as_deref() == Some(replica) && r.2 == after).count();

    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    let after = terminated.load(Ordering::Relaxed);
                    let reply = extract(&gateway, None, 24);
                    results.lock().unwrap().push((reply.status, reply.replica, after, reply.body));
                }
            });
        }
        let until = |what: &str, condition: &dyn Fn() -> bool| {
            let started = Instant::now();
            while !condition() {
                assert!(started.elapsed() < Duration::from_secs(60), "never: {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        until("traffic on both replicas", &|| count("replica-a", false) >= 3 && count("replica-b", false) >= 3);
        // A stream on replica-a when it is told to stop: it must still run to its end.
        let stream = std::iter::repeat_with(|| gateway.open_stream(&chat_body(None, &[], "Write the registration number", 300), &[]))
            .find(|s| s.replica.as_deref() == Some("replica-a"))
            .unwrap();
        terminated.store(true, Ordering::Relaxed);
        a.terminate();
        let rest = stream.finish();
        assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
        let finish: ChatCompletionChunk = parse_str(&rest[rest.len() - 2]);
        assert_eq!(finish.choices[0].finish_reason, Some(FinishReason::Length), "the stream ran to its end");
        let status = a.wait_exit(Duration::from_secs(30)).expect("replica-a exits after draining");
        assert!(status.success(), "{status:?}");
        let served_by_b = count("replica-b", true);
        until("traffic after replica-a is gone", &|| count("replica-b", true) >= served_by_b + 8);
        done.store(true, Ordering::Relaxed);
    });

    let results = results.into_inner().unwrap();
    let failed: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}\n{}", failed.len(), results.len(), gateway.error_log());

    // With no replica left, the gateway's own 502 is JSON too.
    drop(b);
    let reply = extract(&gateway, None, 1);
    assert_gateway_error(&(reply.status, reply.json()), 502, "no_replica_available");
}
