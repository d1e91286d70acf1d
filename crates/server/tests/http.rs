//! `qwen-ocr serve` over real HTTP on loopback with the tiny checkpoint: the same text as
//! `qwen-ocr generate`, adapters per request and at runtime, errors, limits and operations.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use qwen_ocr_server::api::adapters::{AdapterList, LoadedAdapter};
use qwen_ocr_server::api::chat::{ChatCompletion, ChatCompletionChunk};
use qwen_ocr_server::api::error::{ErrorKind, ErrorResponse};
use qwen_ocr_server::api::extract::Extraction;
use qwen_ocr_server::api::models::ModelList;
use qwen_ocr_server::api::ops::{Health, Ready};
use qwen_ocr_server::api::{FinishReason, ObjectKind};
use serde_json::{json, Value};

fn adapter_flags() -> Vec<String> {
    ["lm-qv-r4", "vision-merger-pattern"]
        .iter()
        .flat_map(|a| ["--adapter".to_string(), format!("{a}={}", adapter_dir(a).display())])
        .collect()
}

fn start_with_adapters() -> Server {
    let flags = adapter_flags();
    Server::start(&flags.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn adapters_can_come_from_the_environment() {
    let env = format!("lm={}", adapter_dir("lm-qv-r4").display());
    let server = Server::start_with_env(&[], &[("QWEN_OCR_ADAPTERS", &env)]);
    let (status, body) = server.post_json("/v1/chat/completions", &chat_body(Some("lm"), &["plate.png"], PLATE_PROMPT, 6), &[]);
    assert_eq!(status, 200, "{body}");
    let body: ChatCompletion = parse(&body);
    assert_eq!(body.choices[0].message.content, generate_text("plate.png", PLATE_PROMPT, 6, Some("lm-qv-r4")));
}

#[test]
fn extract_and_chat_return_what_generate_returns_with_and_without_adapters() {
    let server = start_with_adapters();
    for (image, adapter) in [("plate.png", None), ("plate.png", Some("lm-qv-r4")), ("resized.png", Some("vision-merger-pattern"))] {
        let expected = generate_text(image, PLATE_PROMPT, 16, adapter);
        let header: Vec<(&str, &str)> = adapter.map(|a| ("X-Adapter", a)).into_iter().collect();

        let (status, body) =
            server.extract_multipart(&[("image", image, &image_bytes(image))], &[("prompt", PLATE_PROMPT), ("max_tokens", "16")], &header);
        assert_eq!(status, 200, "{body}");
        let body: Extraction = parse(&body);
        assert_eq!(body.raw, expected, "extract {image} {adapter:?}");
        assert_eq!((body.object, body.adapter.as_deref()), (ObjectKind::Extraction, adapter));
        assert_eq!(body.usage.completion_tokens, 16);
        assert!(body.data.is_null() && body.error.is_some(), "random weights write no JSON: {body:?}");

        let query = format!("/v1/extract?max_tokens=16&prompt={}", PLATE_PROMPT.replace(' ', "%20").replace(',', "%2C"));
        let (status, body) = server.post_raw(&query, "image/png", &image_bytes(image), &header);
        assert_eq!(status, 200, "{body}");
        assert_eq!(parse::<Extraction>(&body).raw, expected, "raw-body extract {image} {adapter:?}");

        // The adapter by `model` field, not streamed.
        let (status, body) =
            server.post_json("/v1/chat/completions", &chat_body(adapter.or(Some("base")), &[image], PLATE_PROMPT, 16), &[]);
        assert_eq!(status, 200, "{body}");
        let body: ChatCompletion = parse(&body);
        assert_eq!(body.object, ObjectKind::ChatCompletion);
        assert_eq!(body.choices[0].message.content, expected, "chat {image} {adapter:?}");
        assert_eq!(body.choices[0].finish_reason, FinishReason::Length);
        assert_eq!(body.usage.completion_tokens, 16);

        // The adapter by header, streamed with usage.
        let mut request = chat_body(Some("whatever-the-client-sends-is-overridden"), &[image], PLATE_PROMPT, 16);
        request["stream"] = json!(true);
        request["stream_options"] = json!({ "include_usage": true });
        let (text, finish, lines) = server.chat_stream(&request, &[("X-Adapter", adapter.unwrap_or("base"))]);
        assert_eq!(text, expected, "streamed chat {image} {adapter:?}");
        assert_eq!(finish.as_deref(), Some("length"));
        let usage: ChatCompletionChunk = parse_str(&lines[lines.len() - 2]);
        assert_eq!(usage.usage.flatten().map(|u| u.completion_tokens), Some(16), "the usage chunk precedes [DONE]");
    }
}

#[test]
fn extract_defaults_to_the_adapters_configured_prompt() {
    let prompt = "Read the plate. Reply in JSON.";
    let server = Server::start_with_config(
        &format!("[adapters.plates]\npath = {:?}\nprompt = {prompt:?}\n", adapter_dir("lm-qv-r4").display().to_string()),
        &[],
    );
    let (status, body) =
        server.extract_multipart(&[("image", "plate.png", &image_bytes("plate.png"))], &[("max_tokens", "8")], &[("X-Adapter", "plates")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(parse::<Extraction>(&body).raw, generate_text("plate.png", prompt, 8, Some("lm-qv-r4")));
}

#[test]
fn bad_input_gets_its_status_and_an_openai_error_and_the_server_stays_healthy() {
    let server = Server::start_with_config(
        "max_body_bytes = 300000\nmax_image_pixels = 20000\nmax_images_per_request = 2\nmax_tokens_limit = 64\n",
        &adapter_flags().iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let plate = image_bytes("plate.png");
    let chat = |body: &Value| server.post_json("/v1/chat/completions", body, &[]);

    assert_api_error(&server.post_raw("/v1/chat/completions", "application/json", b"{\"messages\": [", &[]), 400, "invalid_json");
    let mut wrong_type = chat_body(None, &[], "hi", 4);
    wrong_type["max_tokens"] = json!("four");
    assert_api_error(&chat(&wrong_type), 400, "invalid_json");
    assert_api_error(&chat(&json!({ "messages": [] })), 400, "invalid_messages");
    assert_api_error(&chat(&chat_body(None, &[], "hi", 0)), 400, "invalid_max_tokens");
    assert_api_error(&chat(&chat_body(None, &[], "hi", 65)), 400, "invalid_max_tokens");
    let mut hot = chat_body(None, &[], "hi", 4);
    hot["temperature"] = json!(-1);
    assert_api_error(&chat(&hot), 400, "invalid_request");
    assert_api_error(&chat(&chat_body(Some("no-such-adapter"), &[], "hi", 4)), 404, "model_not_found");
    assert_api_error(&chat(&chat_body(None, &["plate.png", "plate.png", "plate.png"], "hi", 4)), 400, "too_many_images");
    let remote = json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url", "image_url": { "url": "https://example.com/a.png" } }] }] });
    assert_api_error(&chat(&remote), 400, "remote_image_not_allowed");
    let bad_b64 = json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url", "image_url": { "url": "data:image/png;base64,@@@" } }] }] });
    assert_api_error(&chat(&bad_b64), 400, "invalid_image_url");

    assert_api_error(&server.extract_multipart(&[], &[("prompt", "hi")], &[]), 400, "missing_image");
    assert_api_error(&server.extract_multipart(&[("image", "a.txt", b"just some text")], &[], &[]), 415, "unsupported_image");
    assert_api_error(&server.extract_multipart(&[("image", "cut.png", &plate[..plate.len() / 2])], &[], &[]), 400, "invalid_image");
    // large.png declares 200x150 = 30000 pixels in its header, over the 20000 limit.
    assert_api_error(&server.extract_multipart(&[("image", "large.png", &image_bytes("large.png"))], &[], &[]), 413, "image_too_large");
    // A client that sends the whole body before it reads reads the 413, not a broken pipe: 4 MB
    // is more than loopback's socket buffers take in while the server answers.
    for bytes in [400_000, 4_000_000] {
        assert_api_error(&server.post_raw("/v1/extract", "image/png", &vec![0u8; bytes], &[]), 413, "body_too_large");
    }
    assert_api_error(&server.extract_multipart(&[("image", "p.png", &plate)], &[("max_tokens", "x")], &[]), 400, "invalid_field");
    assert_api_error(&server.extract_multipart(&[("image", "p.png", &plate)], &[], &[("X-Adapter", "nope")]), 404, "adapter_not_found");
    assert_api_error(&server.post_raw("/v1/extract", "text/plain", b"hello", &[]), 415, "unsupported_content_type");
    assert_api_error(&server.post_raw("/v1/nothing", "text/plain", b"", &[]), 404, "unknown_route");

    assert_eq!(server.get("/health").0, 200);
    let (status, body) = server.extract_multipart(&[("image", "plate.png", &plate)], &[("max_tokens", "4")], &[]);
    assert_eq!(status, 200, "a normal request still works: {body}");
    assert_eq!(parse::<Extraction>(&body).usage.completion_tokens, 4);
    assert!(!server.logs().contains("panicked"));
}

/// An image host on loopback: answers each path as `route` says, and records every path asked for.
struct ImageHost {
    port: u16,
    asked: Arc<Mutex<Vec<String>>>,
}

impl ImageHost {
    fn start(route: fn(&str, u16) -> Vec<u8>) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().map_while(Result::ok) {
                let mut head = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                head.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                while head.read_line(&mut line).is_ok_and(|n| n > 2) {}
                log.lock().unwrap().push(path.clone());
                let _ = conn.write_all(&route(&path, port));
            }
        });
        Self { port, asked }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

fn image_host_routes(path: &str, port: u16) -> Vec<u8> {
    let redirect = |to: String| format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let answer: String = match path {
        "/plate.png" => {
            let png = image_bytes("plate.png");
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", png.len());
            return [head.as_bytes(), &png].concat();
        }
        // A redirect to an allowed host, itself checked before it is followed.
        "/hop" => redirect("/plate.png".into()),
        // The same machine under a name that is not allowed.
        "/to-unlisted" => redirect(format!("http://localhost:{port}/secret")),
        // Allowed host names (listed by the test) whose addresses are private or the metadata service's.
        "/to-private" => redirect("http://10.255.255.1:9/internal.png".into()),
        "/to-metadata" => redirect("http://169.254.169.254/latest/meta-data/".into()),
        "/huge" => "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 900000000\r\nConnection: close\r\n\r\n".into(),
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    };
    answer.into_bytes()
}

fn image_url_chat(url: &str) -> Value {
    let content = json!([{ "type": "image_url", "image_url": { "url": url } }, { "type": "text", "text": PLATE_PROMPT }]);
    json!({ "messages": [{ "role": "user", "content": content }], "max_tokens": 8 })
}

/// Remote images come only from allowed hosts at allowed addresses, hop by hop: a redirect to
/// a host not on the list, or to a private or metadata address, is refused naming the host,
/// before any connection to it (those targets are never contacted: the private ones are not
/// even loopback). Loopback itself is refused unless `allowed_image_networks` lists it.
#[test]
fn remote_images_are_fetched_only_from_allowed_hosts_at_public_addresses_through_every_redirect() {
    let host = ImageHost::start(image_host_routes);
    let server = Server::start_with_config(
        "allowed_image_hosts = [\"127.0.0.1\", \"10.255.255.1\", \"169.254.169.254\"]\nallowed_image_networks = [\"127.0.0.0/8\"]\n",
        &[],
    );
    let chat = |url: &str| server.post_json("/v1/chat/completions", &image_url_chat(url), &[]);
    let (status, reply) = chat(&host.url("/plate.png"));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(parse::<ChatCompletion>(&reply).choices[0].message.content, generate_text("plate.png", PLATE_PROMPT, 8, None));
    assert_eq!(chat(&host.url("/hop")).0, 200, "a redirect to an allowed host is followed");

    let refused = |url: &str, code: &str, names: &str| {
        let reply = chat(url);
        assert_api_error(&reply, 400, code);
        let message = parse::<ErrorResponse>(&reply.1).error.message;
        assert!(message.contains(names), "{message}");
    };
    refused(&host.url("/to-unlisted"), "remote_image_not_allowed", "`localhost`");
    refused(&host.url("/to-private"), "remote_image_not_allowed", "`10.255.255.1` resolves to 10.255.255.1, a private address");
    refused(&host.url("/to-metadata"), "remote_image_not_allowed", "169.254.169.254, a link-local (cloud metadata) address");
    refused("http://169.254.169.254/latest/meta-data/", "remote_image_not_allowed", "link-local");
    refused("http://localhost/plate.png", "remote_image_not_allowed", "`localhost`");
    refused(&host.url("/missing.png"), "image_fetch_failed", "it answered 404");
    assert_api_error(&chat(&host.url("/huge")), 413, "image_too_large");
    let asked = host.asked();
    assert_eq!(asked, ["/plate.png", "/hop", "/plate.png", "/to-unlisted", "/to-private", "/to-metadata", "/missing.png", "/huge"]);

    // The same host without loopback allowed: refused before it is asked anything.
    let strict = Server::start_with_config("allowed_image_hosts = [\"127.0.0.1\"]\n", &[]);
    let reply = strict.post_json("/v1/chat/completions", &image_url_chat(&host.url("/plate.png")), &[]);
    assert_api_error(&reply, 400, "remote_image_not_allowed");
    assert!(parse::<ErrorResponse>(&reply.1).error.message.contains("a loopback address"), "{}", reply.1);
    assert_eq!(host.asked().len(), asked.len(), "the refused host was never contacted");
}

/// Connections past `max_connections` get 503 with `Retry-After` at once, in the API's error
/// shape, without the server reading their request; a slot frees when a connection closes.
#[test]
fn connections_over_max_connections_are_refused_at_once_and_slots_free_when_they_close() {
    let server = Server::start_with_config("max_connections = 2\n", &[]);
    let address = server.base.trim_start_matches("http://").to_string();
    let connect = || TcpStream::connect(&address).unwrap();
    // A slot may still be held for a moment by the readiness probe's connection: such an
    // answer is 503, and the next try gets the slot.
    let get_a_slot = || {
        let started = std::time::Instant::now();
        loop {
            let mut connection = connect();
            let (status, _, _) = exchange(&mut connection, "GET /health HTTP/1.1\r\nhost: x\r\n\r\n");
            if status == 200 {
                return connection;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no slot freed");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut held = vec![get_a_slot(), get_a_slot()];
    let (status, head, body) = exchange(&mut connect(), "GET /health HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_eq!(status, 503, "{head}{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1\r\n"), "{head}");
    let error = parse_str::<ErrorResponse>(&body).error;
    assert_eq!((error.code, error.message.contains("max_connections")), (ErrorKind::TooManyConnections, true), "{body}");
    // The held connections still work, and closing one lets a new one in.
    assert_eq!(exchange(&mut held[0], "GET /health HTTP/1.1\r\nhost: x\r\n\r\n").0, 200);
    held.pop();
    let mut third = get_a_slot();
    // The metrics go over a connection that holds a slot: a fresh one could race the
    // server's noticing that `held[0]` closed, and be refused.
    let (status, _, metrics) = exchange(&mut third, "GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_eq!(status, 200);
    let refused = metrics.lines().find_map(|l| l.strip_prefix("qwen_ocr_connections_refused_total ")?.trim().parse::<f64>().ok());
    assert!(refused.is_some_and(|n| n >= 1.0), "{metrics}");
}

/// Sends one request and reads its answer: (status, head, body).
fn exchange(connection: &mut TcpStream, request: &str) -> (u16, String, String) {
    connection.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    connection.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(connection);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(reader.read_line(&mut head).unwrap() > 0, "connection closed mid-head: {head}");
    }
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|n| n.trim().parse::<usize>().unwrap()))
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (head[9..12].parse().unwrap(), head, String::from_utf8(body).unwrap())
}

/// A 44-byte GIF that declares a 512x16386 canvas (8.4 million pixels) around one 1x1 frame:
/// decoding it fills the whole canvas, seconds of work bought with 44 bytes.
fn tiny_gif_declaring_a_huge_canvas() -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend([0x00, 0x02, 0x02, 0x40]); // the canvas: 512 x 16386, little-endian
    gif.extend([0x80, 0, 0]); // a global colour table of 2 entries; background 0; no aspect
    gif.extend([0, 0, 0, 255, 255, 255]); // black, white
    gif.extend([0x21, 0xfe, 5]); // a comment extension of 5 bytes
    gif.extend(b"tiny!");
    gif.push(0);
    gif.extend([0x2c, 0, 0, 0, 0, 1, 0, 1, 0, 0]); // one 1x1 frame at the top left
    gif.extend([2, 2, 0x44, 0x01, 0]); // LZW: clear, index 0, end
    gif.push(0x3b);
    assert_eq!(gif.len(), 44);
    gif
}

/// An image may declare only as many pixels as its file size pays for: the tiny GIF is
/// refused before decoding, with a 413 that says why, while ordinary images pass.
#[test]
fn a_tiny_file_cannot_buy_the_decoding_of_millions_of_pixels() {
    let server = Server::start(&[]);
    let gif = tiny_gif_declaring_a_huge_canvas();
    let reply = server.post_raw("/v1/extract?max_tokens=1", "image/gif", &gif, &[]);
    assert_api_error(&reply, 413, "image_too_large");
    let message = parse::<ErrorResponse>(&reply.1).error.message;
    assert!(message.contains("512x16386") && message.contains("44 bytes") && message.contains("max_image_pixels_per_byte"), "{message}");
    for (image, content_type) in [("plate.png", "image/png"), ("large.png", "image/png"), ("photo.jpg", "image/jpeg")] {
        let (status, body) = server.post_raw("/v1/extract?max_tokens=1", content_type, &image_bytes(image), &[]);
        assert_eq!(status, 200, "{image}: {body}");
    }
}

#[test]
fn a_request_past_its_timeout_gets_504_and_the_server_carries_on() {
    let server = Server::start_with_config("request_timeout_secs = 0\n", &[]);
    assert_api_error(&server.post_json("/v1/chat/completions", &chat_body(None, &["plate.png"], "hi", 4), &[]), 504, "timeout");
    let mut streamed = chat_body(None, &[], "hi", 4);
    streamed["stream"] = json!(true);
    let (status, _) = server.post_json("/v1/chat/completions", &streamed, &[]);
    assert_eq!(status, 504, "a stream that cannot start is refused before any chunk");
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn api_keys_are_required_when_configured() {
    let server = Server::start_with_env(&["--api-key", "k1"], &[("QWEN_OCR_API_KEYS", "k2,k3")]);
    let body = chat_body(None, &[], "hi", 2);
    assert_api_error(&server.post_json("/v1/chat/completions", &body, &[]), 401, "missing_api_key");
    assert_api_error(&server.post_json("/v1/chat/completions", &body, &[("Authorization", "Bearer k2")]), 401, "invalid_api_key");
    assert_eq!(
        server.post_json("/v1/chat/completions", &body, &[("Authorization", "Bearer k1")]).0,
        200,
        "the flag wins over the environment"
    );
    assert_eq!(server.get("/health").0, 200, "probes need no key");
}

#[test]
fn adapters_load_replace_and_unload_at_runtime_while_requests_run() {
    let server = Server::start(&["--adapters-dir", fixtures().join("adapters/tiny-tied").to_str().unwrap()]);
    let load = |name: &str, path: &str| server.post_json("/v1/adapters", &json!({ "name": name, "path": path }), &[]);
    let extract = |adapter: &str, max_tokens: &str| {
        server.extract_multipart(
            &[("image", "plate.png", &image_bytes("plate.png"))],
            &[("prompt", PLATE_PROMPT), ("max_tokens", max_tokens)],
            &[("X-Adapter", adapter)],
        )
    };
    assert_api_error(&load("hot", "../../images"), 403, "adapter_path_outside");
    assert_api_error(&load("hot", "no-such-dir"), 400, "adapter_path_not_found");
    assert_api_error(&load("base", "lm-qv-r4"), 400, "invalid_adapter_name");
    assert_api_error(&extract("hot", "4"), 404, "adapter_not_found");

    std::thread::scope(|s| {
        // Base-model traffic throughout: none of it may fail.
        let background = s.spawn(|| {
            for _ in 0..12 {
                let (status, body) = extract("base", "8");
                assert_eq!(status, 200, "{body}");
            }
        });
        let (status, body) = load("hot", "lm-qv-r4");
        assert_eq!((status, parse::<LoadedAdapter>(&body).replaced), (201, false), "{body}");
        assert_eq!(parse::<Extraction>(&extract("hot", "16").1).raw, generate_text("plate.png", PLATE_PROMPT, 16, Some("lm-qv-r4")));

        // A long request on the first version, replaced while it runs, finishes on that version.
        let in_flight = s.spawn(|| {
            let mut body = chat_body(Some("hot"), &["plate.png"], PLATE_PROMPT, 400);
            body["stream"] = json!(true);
            server.chat_stream(&body, &[])
        });
        std::thread::sleep(Duration::from_millis(100));
        let (status, body) = load("hot", "vision-merger-pattern");
        assert_eq!((status, parse::<LoadedAdapter>(&body).replaced), (200, true), "{body}");
        let raw = parse::<Extraction>(&extract("hot", "16").1).raw;
        assert_eq!(raw, generate_text("plate.png", PLATE_PROMPT, 16, Some("vision-merger-pattern")));
        let (_, finish, _) = in_flight.join().unwrap();
        assert_eq!(finish.as_deref(), Some("length"), "the in-flight request completed");

        let models: ModelList = parse(&json_get(&server, "/v1/models").1);
        assert!(models.data.iter().any(|m| m.id == "hot" && m.loaded), "{models:?}");
        let (status, _) = delete(&server, "/v1/adapters/hot");
        assert_eq!(status, 200);
        assert_api_error(&extract("hot", "4"), 404, "adapter_not_found");
        assert_eq!(delete(&server, "/v1/adapters/hot").0, 404);
        background.join().unwrap();
    });
}

#[test]
fn a_full_queue_answers_429_with_retry_after_and_a_dropped_client_frees_its_slot() {
    let server = Server::start_with_config("retry_after_secs = 7\n[engine]\nmax_batch_size = 1\nmax_queue = 1\n", &[]);
    let engine = || parse::<Ready>(&json_get(&server, "/ready").1).engine;
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let started = std::time::Instant::now();
        while !cond() {
            assert!(started.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut long = chat_body(None, &[], "Write the registration number", 4000);
    long["stream"] = json!(true);
    let (url, long) = (server.url("/v1/chat/completions"), long.to_string());
    let open_stream = move || ureq::post(&url).send_bytes(long.as_bytes()).unwrap();
    let running = open_stream();
    let mut running_lines = BufReader::new(running.into_reader()).lines();
    running_lines.next();
    wait("one running", &|| engine().running == 1);
    let queued = std::thread::spawn({
        let open_stream = open_stream.clone();
        move || open_stream().into_reader()
    });
    wait("one queued", &|| engine().queue_depth == 1);

    let refused = ureq::post(&server.url("/v1/chat/completions")).send_bytes(chat_body(None, &[], "hi", 2).to_string().as_bytes());
    let Err(ureq::Error::Status(429, response)) = refused else { panic!("expected 429") };
    assert_eq!(response.header("retry-after"), Some("7"));
    let body: ErrorResponse = parse_str(&response.into_string().unwrap());
    assert_eq!(body.error.code, ErrorKind::QueueFull);

    // Clients hang up: their sequences end and the slot serves new work.
    drop(running_lines);
    drop(queued.join().unwrap());
    wait("the engine to drain", &|| {
        let engine = engine();
        engine.running == 0 && engine.queue_depth == 0 && engine.kv_cache_used_bytes == 0
    });
    assert_eq!(server.post_json("/v1/chat/completions", &chat_body(None, &[], "hi", 2), &[]).0, 200);
}

#[test]
fn operations_health_ready_metrics_and_request_ids() {
    let server = start_with_adapters();
    let (status, health) = server.get("/health");
    assert_eq!((status, parse_str::<Health>(&health).status.as_str()), (200, "ok"));
    let response = ureq::post(&server.url("/v1/chat/completions"))
        .set("x-request-id", "trace-me-42")
        .set("x-adapter", "lm-qv-r4")
        .send_bytes(chat_body(None, &["plate.png"], "hi", 3).to_string().as_bytes())
        .unwrap();
    assert_eq!(response.header("x-request-id"), Some("trace-me-42"));
    let generated = ureq::get(&server.url("/health")).call().unwrap();
    assert!(generated.header("x-request-id").is_some_and(|id| id.len() >= 32), "an id is made when the client sends none");
    let (_, metrics) = server.get("/metrics");
    for name in [
        "qwen_ocr_http_requests_total{route=\"/v1/chat/completions\",status=\"200\",adapter=\"lm-qv-r4\"} 1",
        "qwen_ocr_http_request_duration_seconds_bucket",
        "qwen_ocr_time_to_first_token_seconds_bucket",
        "qwen_ocr_queue_depth",
        "qwen_ocr_batch_size_bucket",
        "qwen_ocr_generated_tokens_total",
        "qwen_ocr_kv_cache_used_bytes",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
    assert!(!metrics.contains("qwen_ocr_stage_"), "the stage profile is off unless asked for:\n{metrics}");
    let adapters: AdapterList = parse(&json_get(&server, "/v1/adapters").1);
    assert_eq!(adapters.data.len(), 2);
    assert!(server.logs().lines().any(|l| l.contains("trace-me-42") && l.contains("finished processing request")), "{}", server.logs());
}

#[test]
fn the_stage_profile_counts_each_phase_and_operation_when_asked_for() {
    let server = Server::start_with_env(&[], &[("QWEN_OCR_STAGE_PROFILE", "1")]);
    let (status, body) = server.post_json("/v1/chat/completions", &chat_body(None, &["plate.png"], "Read the plate", 6), &[]);
    assert_eq!(status, 200, "{body}");
    let decode_steps = parse_str::<Ready>(&server.get("/ready").1).engine.steps - 1;
    assert!(decode_steps > 0, "{body}");
    let profile = stage_profile(&server.get("/metrics").1);
    let calls = |phase: &str, op: &str| profile.get(&format!("{phase}.{op}")).map_or(0, |s| s.calls);
    let micros = |phase: &str, op: &str| profile.get(&format!("{phase}.{op}")).map_or(0, |s| s.micros);
    let config: Value = serde_json::from_slice(&std::fs::read(fixtures().join("tiny-tied/config.json")).unwrap()).unwrap();
    let (layers, depth) = (config["num_hidden_layers"].as_u64().unwrap(), config["vision_config"]["depth"].as_u64().unwrap());

    // One image through the tower, one prefill step, then one step per further token; every
    // block attends once per pass, and each step samples once.
    assert_eq!((calls("vision", "total"), calls("vision", "attention")), (1, depth), "{profile:?}");
    assert_eq!((calls("prefill", "total"), calls("prefill", "attention"), calls("prefill", "sampling")), (1, layers, 1));
    assert_eq!(
        (calls("decode", "total"), calls("decode", "attention"), calls("decode", "sampling")),
        (decode_steps, layers * decode_steps, decode_steps)
    );
    for phase in ["vision", "prefill", "decode"] {
        assert!(calls(phase, "products") > 0 && calls(phase, "norms") > 0, "{phase}: {profile:?}");
        // The operations are disjoint parts of their phase (packing is inside products).
        let parts: u64 = ["products", "lora", "attention", "norms", "sampling"].iter().map(|op| micros(phase, op)).sum();
        assert!(parts <= micros(phase, "total") && micros(phase, "packing") <= micros(phase, "products"), "{phase}: {profile:?}");
    }
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let mut server = Server::start(&[]);
    let mut body = chat_body(None, &[], "Write the registration number", 300);
    body["stream"] = json!(true);
    let response = ureq::post(&server.url("/v1/chat/completions")).send_bytes(body.to_string().as_bytes()).unwrap();
    let mut lines = BufReader::new(response.into_reader()).lines();
    lines.next();
    server.terminate();
    let data: Vec<String> = lines.map_while(Result::ok).filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let finish: ChatCompletionChunk = parse_str(&data[data.len() - 2]);
    assert_eq!(finish.choices[0].finish_reason, Some(FinishReason::Length), "the request ran to its end");
    let status = server.wait_exit(Duration::from_secs(20)).expect("the server exits after draining");
    assert!(status.success(), "{status:?}");
}

fn json_get(server: &Server, path: &str) -> (u16, Value) {
    let (status, body) = server.get(path);
    (status, serde_json::from_str(&body).unwrap())
}

fn delete(server: &Server, path: &str) -> (u16, String) {
    match ureq::delete(&server.url(path)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

/// The official `openai` Python package, unchanged, plain and streamed. Python comes from
/// `QWEN_OCR_PYTHON` (CI installs the package into a venv); elsewhere the test says how to
/// enable it, and fails under CI rather than skipping.
#[test]
fn the_official_openai_python_client_works_unchanged() {
    let python = std::env::var("QWEN_OCR_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_openai = std::process::Command::new(&python).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if !has_openai {
        assert!(std::env::var_os("CI").is_none(), "CI must provide the openai package: set QWEN_OCR_PYTHON to a Python that has it");
        eprintln!("skipped: no `openai` package for {python}; `pip install openai` and set QWEN_OCR_PYTHON to run it");
        return;
    }
    let server = Server::start(&["--api-key", "test-key"]);
    let expected = generate_text("plate.png", PLATE_PROMPT, 12, None);
    let script = fixtures().join("../openai_client.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([&server.base, image_path("plate.png").to_str().unwrap(), &expected, "12"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
