//! `POST /v1/extract`'s multipart parsing: axum's `Multipart`, then the handler's field rules
//! (one image, known text fields, numbers that parse), on arbitrary bodies.
//!
//! Input: the boundary, a newline, then the body.
#![no_main]

use std::sync::LazyLock;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::CONTENT_TYPE;
use libfuzzer_sys::fuzz_target;
use qwen_ocr_server::routes::extract::read_multipart;

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("a tokio runtime"));

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (boundary, body) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let content_type = [b"multipart/form-data; boundary=", boundary].concat();
    // A boundary that is no valid header value never reaches the handler.
    let Ok(request) = Request::post("/v1/extract").header(CONTENT_TYPE, content_type).body(Body::from(body.to_vec())) else { return };
    let _ = RUNTIME.block_on(read_multipart(request));
});
