//! PDFs, per-request visual budgets and boxes on `/v1/extract` (and the budget on chat), over
//! real HTTP on the tiny checkpoint: page results, page selection, streaming, every refused
//! document's status, rendering failures confined to their page, and boxes on the caller's
//! image.

mod common;

use std::io::{BufRead, BufReader};

use common::pdf::{self, PageKind};
use common::*;
use qwen_ocr_server::api::chat::ChatCompletion;
use qwen_ocr_server::api::extract::{DocumentExtraction, Extraction, PageExtraction};
use serde_json::{json, Value};

const PROMPT: &str = "Read the invoice.";

fn post_pdf(server: &Server, bytes: &[u8], fields: &[(&str, &str)]) -> (u16, Value) {
    let mut fields = fields.to_vec();
    fields.push(("prompt", PROMPT));
    server.extract_multipart(&[("file", "doc.pdf", bytes)], &fields, &[])
}

/// `/v1/extract` streamed: the data of every event, `[DONE]` included.
fn extract_events(server: &Server, query: &str, content_type: &str, body: &[u8]) -> Vec<String> {
    let response =
        ureq::post(&server.url(&format!("/v1/extract?{query}"))).set("content-type", content_type).send_bytes(body).expect("200");
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    BufReader::new(response.into_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// `(visual tokens, [height, width])` that `qwen-ocr preprocess` predicts for an image.
fn preprocessed(image: &str, max_pixels: u64) -> (u64, [u64; 2]) {
    let (model, image, max) = (tiny_model(), image_path(image).display().to_string(), max_pixels.to_string());
    let out = qwen_ocr(&["preprocess", "--model", &model, "--image", &image, "--max-pixels", &max]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    (json["visual_tokens"].as_u64().unwrap(), [json["resized"][0].as_u64().unwrap(), json["resized"][1].as_u64().unwrap()])
}

#[test]
fn a_pdf_gives_one_result_per_page_and_pages_selects_them() {
    let server = Server::start(&[]);
    let three = pdf::document(3);
    let (status, body) = post_pdf(&server, &three, &[("max_tokens", "6")]);
    assert_eq!(status, 200, "{body}");
    let document: DocumentExtraction = parse(&body);
    assert_eq!((document.page_count, document.pages.iter().map(|p| p.page).collect::<Vec<_>>()), (3, vec![1, 2, 3]));
    // The tiny checkpoint's budget is 50176 pixels: US Letter (612 x 792 points) renders at the
    // scale that fills it, to 196 x 254 pixels at 23.2 dpi.
    let scale = (50176.0f64 / (612.0 * 792.0)).sqrt();
    for page in &document.pages {
        // Read by the model (whose random weights write no JSON).
        assert_eq!(page.error.as_deref(), Some("the model's output contains no JSON"), "{page:?}");
        assert_eq!((page.width, page.height), (Some((612.0 * scale) as u32), Some((792.0 * scale) as u32)), "{page:?}");
        assert!((page.dpi.unwrap() - 72.0 * scale).abs() < 1e-3, "{page:?}");
        assert_eq!(page.usage.completion_tokens, 6);
        assert!(page.finish_reason.is_some() && page.timings.is_some());
    }
    let prompt_tokens: usize = document.pages.iter().map(|p| p.usage.prompt_tokens).sum();
    assert_eq!((document.usage.prompt_tokens, document.usage.completion_tokens), (prompt_tokens, 18));

    // The raw form, with the options in the query string.
    let (status, body) = server.post_raw("/v1/extract?pages=2-3&max_tokens=6", "application/pdf", &three, &[]);
    assert_eq!(status, 200, "{body}");
    let selected: DocumentExtraction = parse(&body);
    assert_eq!(selected.pages.iter().map(|p| p.page).collect::<Vec<_>>(), [2, 3]);
    let (status, body) = post_pdf(&server, &three, &[("max_tokens", "6"), ("pages", "3,1")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(parse::<DocumentExtraction>(&body).pages.iter().map(|p| p.page).collect::<Vec<_>>(), [1, 3]);
    // A document encrypted with an empty user password needs no password.
    let (status, body) = post_pdf(&server, &pdf::encrypted(""), &[("max_tokens", "2")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(parse::<DocumentExtraction>(&body).pages.len(), 1);
}

#[test]
fn streamed_pages_arrive_one_event_each_then_done() {
    let server = Server::start(&[]);
    let three = pdf::document(3);
    let (status, body) = post_pdf(&server, &three, &[("max_tokens", "5")]);
    assert_eq!(status, 200, "{body}");
    let whole = parse::<DocumentExtraction>(&body).pages;

    let events = extract_events(&server, "stream=true&max_tokens=5&prompt=Read%20the%20invoice.", "application/pdf", &three);
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[3], "[DONE]");
    let mut streamed: Vec<PageExtraction> = events[..3].iter().map(|e| parse_str(e)).collect();
    streamed.sort_by_key(|p| p.page);
    for (streamed, whole) in streamed.iter().zip(&whole) {
        assert_eq!((streamed.page, &streamed.raw, streamed.usage), (whole.page, &whole.raw, whole.usage), "greedy: the same text");
    }
    // An image streams as a one-page document.
    let events = extract_events(&server, "stream=true&max_tokens=3", "image/png", &image_bytes("plate.png"));
    assert_eq!(events.len(), 2, "{events:?}");
    let page: PageExtraction = parse_str(&events[0]);
    assert_eq!((page.page, page.dpi, page.width, page.usage.completion_tokens), (1, None, Some(image_size("plate.png").0), 3));
}

#[test]
fn each_bad_document_gets_its_status_before_any_model_work() {
    let server = Server::start_with_config("max_pdf_pages = 2\n", &[]);
    let three = pdf::document(3);
    let eof = pdf::find(&three, b"%%EOF").unwrap();
    /// What is wrong, the document, the form fields, the status and the code.
    type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("cut in the middle", three[..three.len() * 2 / 3].to_vec(), vec![], 400, "truncated_pdf"),
        ("cut before %%EOF", three[..eof].to_vec(), vec![], 400, "truncated_pdf"),
        ("fewer pages than /Count", pdf::declaring(2, 3), vec![], 400, "truncated_pdf"),
        ("a user password", pdf::encrypted("secret"), vec![], 400, "pdf_needs_password"),
        ("no pages", pdf::no_pages(), vec![], 400, "empty_pdf"),
        ("pages past the end", pdf::document(2), vec![("pages", "2-5")], 400, "invalid_pages"),
        ("pages that do not parse", pdf::document(2), vec![("pages", "two")], 400, "invalid_pages"),
        ("more pages than max_pdf_pages", three.clone(), vec![], 413, "too_many_pages"),
        ("a header and nothing else readable", b"%PDF-1.7\nnothing here\nstartxref\n0\n%%EOF\n".to_vec(), vec![], 400, "invalid_pdf"),
    ];
    for (what, bytes, fields, status, code) in &cases {
        let got = post_pdf(&server, bytes, fields);
        assert_eq!(got.0, *status, "{what}: {}", got.1);
        assert_api_error(&got, *status, code);
    }
    let not_a_pdf = server.post_raw("/v1/extract", "application/pdf", &image_bytes("plate.png"), &[]);
    assert_api_error(&not_a_pdf, 415, "not_a_pdf");
    let pages_of_an_image = server.extract_multipart(&[("image", "plate.png", &image_bytes("plate.png"))], &[("pages", "1")], &[]);
    assert_api_error(&pages_of_an_image, 400, "invalid_pages");
    // Refused before the engine saw a token.
    assert_eq!(metric(&server, "qwen_ocr_prompt_tokens_total"), 0.0);
    // Within the limit the same document is read (and the counter above is the real one).
    let (status, body) = post_pdf(&server, &three, &[("pages", "2-"), ("max_tokens", "2")]);
    assert_eq!(status, 200, "{body}");
    assert!(metric(&server, "qwen_ocr_prompt_tokens_total") > 0.0);
}

/// Reads a document whose second of three pages cannot be rendered: the first and last are read
/// (the last by a fresh renderer), the second fails with a reason naming `limit`.
fn read_around_a_hostile_page(config: &str, hostile: PageKind, limit: &str) {
    let server = Server::start_with_config(config, &[]);
    let document = pdf::with_pages(&[PageKind::Invoice, hostile, PageKind::Invoice]);
    assert!(document.len() < 16 << 20, "{} bytes: within max_body_bytes", document.len());
    let (status, body) = post_pdf(&server, &document, &[("max_tokens", "2")]);
    assert_eq!(status, 200, "{body}");
    let pages = parse::<DocumentExtraction>(&body).pages;
    assert_eq!(pages.iter().map(|p| p.page).collect::<Vec<_>>(), [1, 2, 3]);
    for page in [&pages[0], &pages[2]] {
        assert!(page.finish_reason.is_some() && page.usage.completion_tokens == 2, "{page:?}");
    }
    let failed = &pages[1];
    assert!(failed.error.as_deref().is_some_and(|e| e.contains(limit)), "{failed:?}");
    assert_eq!((failed.finish_reason, failed.usage.total_tokens, &failed.data), (None, 0, &Value::Null), "{failed:?}");
    assert!(!server.logs().contains("panicked"), "{}", server.logs());
}

#[test]
fn a_page_too_slow_to_render_fails_alone() {
    // Five million full-page fills cannot be drawn in 2 s. The renderer's address space grows as
    // it records them: on a fast CPU it passed the default 2 GiB limit within the 2 s (seen on a
    // clean-clone CI run), so this test lifts that limit, leaving the clock as the only bound.
    let config = "pdf_page_timeout_secs = 2\npdf_render_memory_bytes = 8589934592\n";
    read_around_a_hostile_page(config, PageKind::Fills { count: 5_000_000 }, "pdf_page_timeout_secs");
}

#[test]
fn a_page_whose_forms_multiply_is_refused_before_drawing() {
    // Forms drawing forms, 9 levels of 8: 8^9 draws, refused at once (no timeout needed).
    read_around_a_hostile_page("pdf_page_timeout_secs = 600\n", PageKind::FanOut { depth: 9, fanout: 8 }, "forms that draw forms");
}

#[test]
fn a_page_too_big_to_render_fails_alone() {
    // A content stream inflating to 384 MiB cannot be held in a renderer of 256 MiB.
    read_around_a_hostile_page("pdf_render_memory_bytes = 268435456\n", PageKind::Inflating { megabytes: 384 }, "pdf_render_memory_bytes");
}

/// The size an image is shown at: decoded, with its EXIF orientation applied.
fn image_size(name: &str) -> (u32, u32) {
    use image::ImageDecoder;
    let mut decoder = image::ImageReader::open(image_path(name)).unwrap().with_guessed_format().unwrap().into_decoder().unwrap();
    let (w, h) = decoder.dimensions();
    let turned = matches!(decoder.orientation().unwrap(), image::metadata::Orientation::Rotate90 | image::metadata::Orientation::Rotate270);
    if turned {
        (h, w)
    } else {
        (w, h)
    }
}

#[test]
fn per_request_pixels_change_the_prompt_tokens_as_preprocessing_predicts() {
    let server = Server::start(&[]);
    let plate = image_bytes("plate.png");
    let extract = |max_pixels: &str| {
        let (status, body) =
            server.extract_multipart(&[("image", "plate.png", &plate)], &[("max_tokens", "1"), ("max_pixels", max_pixels)], &[]);
        assert_eq!(status, 200, "{body}");
        parse::<Extraction>(&body).usage.prompt_tokens as i64
    };
    let (small, large) = (preprocessed("plate.png", 3136).0 as i64, preprocessed("plate.png", 50176).0 as i64);
    assert_ne!(small, large);
    assert_eq!(extract("50176") - extract("3136"), large - small);

    let chat = |body: Value| {
        let (status, body) = server.post_json("/v1/chat/completions", &body, &[]);
        assert_eq!(status, 200, "{body}");
        parse::<ChatCompletion>(&body).usage.prompt_tokens as i64
    };
    let mut vllm = chat_body(None, &["plate.png"], PLATE_PROMPT, 1);
    vllm["mm_processor_kwargs"] = json!({ "max_pixels": 3136 });
    let mut lmdeploy = chat_body(None, &["plate.png"], PLATE_PROMPT, 1);
    lmdeploy["messages"][0]["content"][0]["image_url"]["max_pixels"] = json!(3136);
    lmdeploy["mm_processor_kwargs"] = json!({ "max_pixels": 50176 }); // the image's own bound wins
    let default = chat(chat_body(None, &["plate.png"], PLATE_PROMPT, 1));
    assert_eq!(default - chat(vllm), large - small);
    assert_eq!(default - chat(lmdeploy), large - small);

    // A PDF page is rendered to its budget.
    let (status, body) = post_pdf(&server, &pdf::document(1), &[("max_tokens", "1"), ("max_pixels", "3136")]);
    assert_eq!(status, 200, "{body}");
    let page = &parse::<DocumentExtraction>(&body).pages[0];
    assert!(page.width.unwrap() * page.height.unwrap() <= 3136, "{page:?}");

    // Out of range: 400 naming the field.
    let too_small = server.extract_multipart(&[("image", "plate.png", &plate)], &[("max_pixels", "100")], &[]);
    assert_api_error(&too_small, 400, "invalid_field");
    assert!(too_small.1["error"]["message"].as_str().unwrap().starts_with("max_pixels must be between 784 and"), "{}", too_small.1);
    let crossed = server.post_raw("/v1/extract?min_pixels=40000&max_pixels=3136", "image/png", &plate, &[]);
    assert_api_error(&crossed, 400, "invalid_field");
    let mut bad = chat_body(None, &["plate.png"], PLATE_PROMPT, 1);
    bad["mm_processor_kwargs"] = json!({ "min_pixels": 1u64 << 40 });
    let (status, body) = server.post_json("/v1/chat/completions", &bad, &[]);
    assert!(status == 400 && body["error"]["message"].as_str().unwrap().starts_with("mm_processor_kwargs.min_pixels"), "{body}");
    let mut bad = chat_body(None, &["plate.png"], PLATE_PROMPT, 1);
    bad["messages"][0]["content"][0]["image_url"]["max_pixels"] = json!(10);
    let (status, body) = server.post_json("/v1/chat/completions", &bad, &[]);
    assert!(
        status == 400 && body["error"]["message"].as_str().unwrap().starts_with("messages[0].content[0].image_url.max_pixels"),
        "{body}"
    );
}

#[test]
fn boxes_land_on_the_rotated_image_as_it_is_shown() {
    let server = Server::start(&[]);
    // The grammar allows only this answer: corners given right-to-left, 0-1000 (Qwen2-VL).
    let schema = json!({
        "type": "object",
        "properties": { "label": { "const": "plate" }, "bbox_2d": { "const": [700, 200, 100, 900] } },
        "required": ["label", "bbox_2d"],
        "additionalProperties": false,
    });
    let rotated = image_bytes("rotated.jpg");
    let (status, body) = server.extract_multipart(
        &[("image", "rotated.jpg", &rotated)],
        &[("schema", &schema.to_string()), ("max_tokens", "64"), ("max_pixels", "3136")],
        &[],
    );
    assert_eq!(status, 200, "{body}");
    let extraction: Extraction = parse(&body);
    assert_eq!(extraction.data, json!({ "label": "plate", "bbox_2d": [700, 200, 100, 900] }));
    // Stored 120 x 80, shown (EXIF orientation 6) 80 x 120; the model saw it resized smaller.
    let (width, height) = image_size("rotated.jpg");
    assert_eq!((width, height), (80, 120));
    assert!(preprocessed("rotated.jpg", 3136).1 != [120, 80], "resized");
    let expected = [100.0 * 80.0 / 1000.0, 200.0 * 120.0 / 1000.0, 700.0 * 80.0 / 1000.0, 900.0 * 120.0 / 1000.0];
    assert_eq!(extraction.boxes.len(), 1, "{body}");
    assert_eq!((extraction.boxes[0].label.as_deref(), extraction.boxes[0].bbox, extraction.boxes[0].page), (Some("plate"), expected, 1));
}

/// Writes the seeds of the `pdf_document` fuzz target (its first byte picks the pixel budget),
/// from the builders above; run by hand when they change:
/// `cargo test -p qwen-ocr-server --test documents -- --ignored write_the_pdf_fuzz_seeds`.
#[test]
#[ignore = "writes fuzz/seeds/pdf_document"]
fn write_the_pdf_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/pdf_document");
    std::fs::create_dir_all(&dir).unwrap();
    let seeds = [
        ("invoices.pdf", 2, pdf::document(2)),
        ("encrypted-no-password.pdf", 1, pdf::encrypted("")),
        ("encrypted-password.pdf", 1, pdf::encrypted("secret")),
        ("count-mismatch.pdf", 0, pdf::declaring(1, 2)),
        ("no-pages.pdf", 0, pdf::no_pages()),
        ("nested-forms.pdf", 3, pdf::with_pages(&[PageKind::FanOut { depth: 3, fanout: 2 }, PageKind::Invoice])),
    ];
    for (name, budget, bytes) in seeds {
        std::fs::write(dir.join(name), [&[budget][..], &bytes].concat()).unwrap();
    }
}
