//! `POST /v1/chat/completions` up to the model: the body parsed into the OpenAI request, its
//! messages converted to the chat template's `ChatMessage`s and its `data:` image URLs decoded.
//!
//! Input: the request body.
#![no_main]

use std::sync::LazyLock;

use axum::body::Bytes;
use libfuzzer_sys::fuzz_target;
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_server::config::ServerConfig;
use qwen_ocr_server::routes::chat::parse_messages;
use qwen_ocr_server::state::AppState;

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("a tokio runtime"));
// The default configuration allows no remote image hosts, so nothing is fetched.
static STATE: LazyLock<AppState> = LazyLock::new(|| {
    let metrics = qwen_ocr_server::metrics::install().expect("the metrics recorder");
    AppState::new(ServerConfig::default(), metrics)
});

fuzz_target!(|data: &[u8]| {
    let Ok((messages, images)) = RUNTIME.block_on(parse_messages(&STATE, Bytes::copy_from_slice(data))) else { return };
    // Each image placeholder has its bytes, and the template can be given the messages.
    assert_eq!(messages.iter().map(ChatMessage::image_count).sum::<usize>(), images.len());
    serde_json::to_value(&messages).expect("messages serialize for the chat template");
});
