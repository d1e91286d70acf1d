//! Load and faults over real HTTP on loopback with the tiny checkpoint: a small queue under
//! many clients that honour `Retry-After`, and clients too slow to send their requests.
//! (SIGTERM draining and a dropped stream freeing its slot are in tests/http.rs.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const REQUESTS: usize = 1000;
const CLIENTS: usize = 64;
/// Well above what the tiny model and 64 connections need (about 210 MiB): a leak per
/// request or an unbounded queue would cross it, an ordinary allocator high-water mark not.
const RSS_BOUND: u64 = 768 << 20;

/// One `/v1/extract` attempt: its status and, on 429, the `Retry-After` seconds.
fn extract_once(agent: &ureq::Agent, url: &str, png: &[u8]) -> (u16, Option<u64>) {
    let sent = agent.post(url).set("content-type", "image/png").send_bytes(png);
    let response = match sent {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let retry_after = response.header("retry-after").map(|s| s.parse().expect("Retry-After is whole seconds"));
    let status = response.status();
    let body = response.into_string().unwrap();
    assert!(status == 200 || status == 429, "only 200 and 429 are expected, got {status}: {body}");
    (status, retry_after)
}

/// Takes request numbers until all are served, retrying each 429 after its `Retry-After`.
fn client(url: &str, png: &[u8], next: &AtomicUsize, refused: &AtomicU64) {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build();
    while next.fetch_add(1, Ordering::SeqCst) < REQUESTS {
        loop {
            match extract_once(&agent, url, png) {
                (200, _) => break,
                (_, retry_after) => {
                    refused.fetch_add(1, Ordering::SeqCst);
                    let secs = retry_after.expect("a 429 carries Retry-After");
                    std::thread::sleep(Duration::from_secs(secs));
                }
            }
        }
    }
}

/// Sets its flag when dropped, unwinding included.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_thousand_extracts_at_concurrency_64_against_a_small_queue_are_all_served_in_bounded_memory() {
    let server = Server::start_with_config("retry_after_secs = 1\n[engine]\nmax_batch_size = 4\nmax_queue = 8\n", &[]);
    let (url, png, pid) = (server.url("/v1/extract?max_tokens=1&prompt=Read%20it"), image_bytes("plate.png"), server.pid());
    let (next, refused, done, peak) = (AtomicUsize::new(0), AtomicU64::new(0), AtomicBool::new(false), AtomicU64::new(0));
    std::thread::scope(|s| {
        // RSS sampled while the load runs, not only after it.
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(rss_bytes(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // Set however the clients end: a client's panic, re-raised by its join, must stop the
        // sampler too, or the scope would wait for it forever instead of failing the test.
        let _stop_sampling = SetOnDrop(&done);
        let clients: Vec<_> = (0..CLIENTS).map(|_| s.spawn(|| client(&url, &png, &next, &refused))).collect();
        for c in clients {
            c.join().unwrap();
        }
    });
    wait_idle(&server);
    let (served, refused) =
        (metric_sum(&server, "qwen_ocr_http_requests_total{route=\"/v1/extract\",status=\"200\""), refused.into_inner());
    assert_eq!(served, REQUESTS as f64, "every request was finally served once");
    assert!(refused > 0, "64 clients against a queue of 8 must have met 429s, or the test exercised nothing");
    let (peak, after) = (peak.into_inner(), rss_bytes(pid));
    assert!(peak < RSS_BOUND && after < RSS_BOUND, "RSS peaked at {peak} bytes, {after} after the load; bound {RSS_BOUND}");
    eprintln!("{REQUESTS} served after {refused} refusals; RSS peak {} MiB, after {} MiB", peak >> 20, after >> 20);
}

/// Sums the samples of a labelled metric whose line starts with `prefix` (any further labels).
fn metric_sum(server: &Endpoint, prefix: &str) -> f64 {
    let (_, text) = server.get("/metrics");
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Sends `head` at once, then the body one byte every 100 ms from another thread until the
/// server answers; returns the answer's status and JSON body.
fn trickle_body(server: &Server, head: &str, body: &[u8]) -> (u16, Value) {
    let stream = TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    writer.write_all(head.as_bytes()).unwrap();
    let body = body.to_vec();
    std::thread::spawn(move || {
        for byte in body {
            // The server closing the connection after its answer ends the trickle.
            if writer.write_all(&[byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    read_response(stream)
}

/// A connection that sends a request head one byte every 100 ms, for as long as it is kept.
fn trickle_head(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
    let mut writer = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nX-Slow: {}", "a".repeat(10_000));
        for byte in head.bytes() {
            if writer.write_all(&[byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    stream
}

/// Asserts that the server closes `stream` (end of file or reset) before `within` passes.
fn assert_closed_within(mut stream: TcpStream, within: Duration) {
    stream.set_read_timeout(Some(within)).unwrap();
    let read = stream.read(&mut [0u8; 1]);
    let closed = matches!(read, Ok(0)) || read.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
    assert!(closed, "the slow head's connection is still open: {read:?}");
}

/// An HTTP/1.1 response with a `Content-Length` body, read off a raw connection.
fn read_response(stream: TcpStream) -> (u16, Value) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("the server answers the slow client");
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

#[test]
fn a_trickled_body_gets_408_a_trickled_head_is_dropped_and_neither_holds_the_only_slot() {
    let server = Server::start_with_config("read_timeout_secs = 1\n[engine]\nmax_batch_size = 1\nmax_queue = 1\n", &[]);
    let body = chat_body(None, &["plate.png"], "hi", 2).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    let answer = trickle_body(&server, &head, body.as_bytes());
    assert_api_error(&answer, 408, "read_timeout");
    assert!(answer.1["error"].as_object().unwrap().contains_key("param"), "OpenAI's clients read `param`: {}", answer.1);
    // The body would take minutes at this pace; the answer came at the 1 s timeout.
    assert!(started.elapsed() < Duration::from_secs(20), "408 after {:?}", started.elapsed());

    // Nothing was left holding the one batch slot, and a client trickling its headers holds
    // none either (no handler runs before the head is complete): a normal request is served,
    // and the trickling connection is closed once its head is late (hyper answers nothing).
    let slow_head = trickle_head(&server);
    assert_eq!(running(&server), 0);
    let (status, reply) = server.post_json("/v1/chat/completions", &chat_body(None, &["plate.png"], "hi", 2), &[]);
    assert_eq!(status, 200, "{reply}");
    assert_closed_within(slow_head, Duration::from_secs(20));
    assert_eq!(metric_sum(&server, "qwen_ocr_http_requests_total{route=\"/v1/chat/completions\",status=\"408\""), 1.0);
}
