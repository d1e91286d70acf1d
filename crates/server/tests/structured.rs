//! Schema-guaranteed output over real HTTP on the tiny checkpoint: extraction profiles,
//! per-request schemas, `response_format` on chat, log-probabilities and bad schemas. The
//! checkpoint's random weights never write JSON on their own, so every valid answer here is
//! the constraint's doing.

mod common;

use common::json_schema::validate;
use common::*;
use qwen_ocr_server::api::adapters::AdapterList;
use qwen_ocr_server::api::chat::{ChatCompletion, ChatCompletionChunk};
use qwen_ocr_server::api::error::ErrorResponse;
use qwen_ocr_server::api::extract::Extraction;
use qwen_ocr_server::api::logprobs::TokenLogprob;
use qwen_ocr_server::api::FinishReason;
use serde_json::{json, Value};

/// The plate adapter's profile schema: bounded strings, so an answer always finishes.
fn profile_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "Vehicle Sr No": { "type": "string", "maxLength": 10 },
            "Engine No": { "type": "string", "maxLength": 10 },
            "Model": { "type": "string", "maxLength": 12 }
        },
        "required": ["Vehicle Sr No", "Engine No", "Model"],
        "additionalProperties": false
    })
}

/// A string pattern, an integer range and an enum (shared with the model crate's tests).
fn plate_schema() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("schemas/plate.schema.json")).unwrap()).unwrap()
}

fn assert_valid_extraction(body: &Value, schema: &Value, what: &str) -> Extraction {
    let extraction: Extraction = parse(body);
    assert_eq!(extraction.finish_reason, FinishReason::Stop, "{what}: {body}");
    validate(&extraction.data, schema).unwrap_or_else(|e| panic!("{what}: {e}\n{body}"));
    let data = extraction.data.as_object().unwrap();
    let confidence = extraction.confidence.as_ref().unwrap_or_else(|| panic!("{what}: no confidence: {body}"));
    assert_eq!(confidence.keys().collect::<Vec<_>>(), data.keys().collect::<Vec<_>>(), "{what}");
    for (field, c) in confidence {
        let c = c.as_f64().unwrap();
        assert!((0.0..=1.0).contains(&c), "{what}: {field} confidence {c}");
    }
    extraction
}

#[test]
fn extract_with_a_profile_gives_valid_fields_and_confidences_for_every_committed_image() {
    let toml = format!(
        "[adapters.plates]\npath = {:?}\nprompt = {PLATE_PROMPT:?}\nschema_file = \"plates.schema.json\"\nmax_tokens = 96\nmax_pixels = 50176\n",
        adapter_dir("lm-qv-r4").display().to_string()
    );
    let server = Server::start_with_config_files(&toml, &[("plates.schema.json", &profile_schema().to_string())], &[]);
    let mut images: Vec<String> =
        std::fs::read_dir(fixtures().join("images")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    images.sort();
    assert!(images.len() >= 8, "{images:?}");
    for image in &images {
        let (status, body) = server.extract_multipart(&[("image", image, &image_bytes(image))], &[], &[("X-Adapter", "plates")]);
        assert_eq!(status, 200, "{image}: {body}");
        let extraction = assert_valid_extraction(&body, &profile_schema(), image);
        assert_eq!(extraction.adapter.as_deref(), Some("plates"));
    }
    // The same image on the base model, which has no profile schema: the model's own text,
    // which is not JSON.
    let (status, body) = server.extract_multipart(&[("image", "plate.png", &image_bytes("plate.png"))], &[("max_tokens", "24")], &[]);
    assert_eq!(status, 200, "{body}");
    let extraction: Extraction = parse(&body);
    assert!(extraction.data.is_null() && extraction.confidence.is_none(), "{body}");

    let (_, listed) = server.get("/v1/adapters");
    let listed: AdapterList = parse_str(&listed);
    assert_eq!(listed.data[0].profile.schema, Some(profile_schema()));
    assert_eq!(listed.data[0].profile.max_pixels, Some(50176));
}

#[test]
fn a_request_schema_with_a_pattern_an_integer_range_and_an_enum_validates_and_a_cut_answer_says_length() {
    let server = Server::start(&[]);
    let schema = plate_schema().to_string();
    for image in ["plate.png", "photo.jpg"] {
        let (status, body) = server.extract_multipart(&[("image", image, &image_bytes(image))], &[("schema", &schema)], &[]);
        assert_eq!(status, 200, "{body}");
        assert_valid_extraction(&body, &plate_schema(), image);
    }
    let query: String = schema.bytes().map(|b| format!("%{b:02X}")).collect();
    let (status, body) = server.post_raw(&format!("/v1/extract?schema={query}"), "image/png", &image_bytes("gray.png"), &[]);
    assert_eq!(status, 200, "{body}");
    assert_valid_extraction(&body, &plate_schema(), "query schema");

    let (status, body) =
        server.extract_multipart(&[("image", "plate.png", &image_bytes("plate.png"))], &[("schema", &schema), ("max_tokens", "3")], &[]);
    assert_eq!(status, 200, "{body}");
    let extraction: Extraction = parse(&body);
    assert_eq!(extraction.finish_reason, FinishReason::Length);
    assert!(extraction.data.is_null() && extraction.error.unwrap().contains("max_tokens"), "{body}");
}

fn with_format(mut body: Value, format: Value) -> Value {
    body["response_format"] = format;
    body
}

fn json_schema_format(schema: Value) -> Value {
    json!({ "type": "json_schema", "json_schema": { "name": "plate", "schema": schema, "strict": true } })
}

#[test]
fn chat_enforces_json_schema_and_json_object_beside_unconstrained_and_adapter_requests() {
    let adapter = format!("lm={}", adapter_dir("lm-qv-r4").display());
    let server = Server::start(&["--adapter", &adapter]);
    let solo_base = generate_text("plate.png", PLATE_PROMPT, 16, None);
    let solo_adapter = generate_text("plate.png", PLATE_PROMPT, 16, Some("lm-qv-r4"));
    let schema = plate_schema();
    let constrained = with_format(chat_body(None, &["plate.png"], PLATE_PROMPT, 64), json_schema_format(schema.clone()));
    let mut streamed = with_format(chat_body(Some("lm"), &["plate.png"], PLATE_PROMPT, 64), json_schema_format(schema.clone()));
    streamed["stream"] = json!(true);
    // Any object is allowed, so its length is the model's choice: this prompt's is short.
    let object = with_format(chat_body(None, &["plate.png"], "Describe it as JSON.", 64), json!({ "type": "json_object" }));
    let cut = with_format(chat_body(None, &["plate.png"], PLATE_PROMPT, 4), json_schema_format(schema.clone()));

    // All at once, so that the engine batches them together.
    std::thread::scope(|s| {
        let server = &server;
        let plain = |body: Value| s.spawn(move || server.post_json("/v1/chat/completions", &body, &[]));
        let constrained = plain(constrained);
        let object = plain(object);
        let cut = plain(cut);
        let base = plain(chat_body(None, &["plate.png"], PLATE_PROMPT, 16));
        let adapted = plain(chat_body(Some("lm"), &["plate.png"], PLATE_PROMPT, 16));
        let streamed = s.spawn(move || server.chat_stream(&streamed, &[]));

        let content = |reply: &(u16, Value)| {
            assert_eq!(reply.0, 200, "{}", reply.1);
            let ChatCompletion { mut choices, .. } = parse(&reply.1);
            let choice = choices.remove(0);
            (choice.message.content, choice.finish_reason)
        };
        let (text, finish) = content(&constrained.join().unwrap());
        assert_eq!(finish, FinishReason::Stop);
        validate(&serde_json::from_str(&text).unwrap(), &schema).unwrap();
        let (text, finish) = content(&object.join().unwrap());
        assert_eq!(finish, FinishReason::Stop, "{text}");
        assert!(serde_json::from_str::<Value>(&text).unwrap().is_object(), "{text}");
        let (text, finish) = content(&cut.join().unwrap());
        assert_eq!(finish, FinishReason::Length, "{text}");
        assert!(serde_json::from_str::<Value>(&text).is_err(), "four tokens cannot finish this JSON: {text}");
        assert_eq!(content(&base.join().unwrap()).0, solo_base);
        assert_eq!(content(&adapted.join().unwrap()).0, solo_adapter);
        let (text, finish, _) = streamed.join().unwrap();
        assert_eq!(finish.as_deref(), Some("stop"));
        validate(&serde_json::from_str(&text).unwrap(), &schema).unwrap();
    });
}

#[test]
fn logprobs_are_openai_shaped_sorted_and_agree_with_the_greedy_choice_plain_and_streamed() {
    let server = Server::start(&[]);
    let mut body = chat_body(None, &["plate.png"], PLATE_PROMPT, 8);
    body["temperature"] = json!(0);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(4);
    let (status, reply) = server.post_json("/v1/chat/completions", &body, &[]);
    assert_eq!(status, 200, "{reply}");
    let reply: ChatCompletion = parse(&reply);
    let entries = reply.choices[0].logprobs.clone().unwrap().content;
    assert_eq!(entries.len(), 8);
    let mut bytes = Vec::new();
    for entry in &entries {
        let top = &entry.top_logprobs;
        assert_eq!(top.len(), 4);
        assert_eq!((&top[0].token, top[0].logprob, &top[0].bytes), (&entry.token, entry.logprob, &entry.bytes));
        let values: Vec<f32> = top.iter().map(|t| t.logprob).collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]) && values[0] <= 0.0, "{values:?}");
        bytes.extend(&entry.bytes);
    }
    assert_eq!(String::from_utf8(bytes).unwrap(), reply.choices[0].message.content);

    body["stream"] = json!(true);
    let (_, _, lines) = server.chat_stream(&body, &[]);
    let streamed: Vec<TokenLogprob> = lines
        .iter()
        .filter(|l| *l != "[DONE]")
        .flat_map(|l| parse_str::<ChatCompletionChunk>(l).choices.into_iter().filter_map(|c| c.logprobs).flat_map(|l| l.content))
        .collect();
    assert_eq!(streamed, entries, "the stream carries the same log-probabilities");

    // Without `logprobs`, none; out-of-range or orphan `top_logprobs` are refused.
    body["stream"] = json!(false);
    body["logprobs"] = json!(false);
    body.as_object_mut().unwrap().remove("top_logprobs");
    assert!(parse::<ChatCompletion>(&server.post_json("/v1/chat/completions", &body, &[]).1).choices[0].logprobs.is_none());
    body["top_logprobs"] = json!(2);
    assert_api_error(&server.post_json("/v1/chat/completions", &body, &[]), 400, "invalid_logprobs");
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(21);
    assert_api_error(&server.post_json("/v1/chat/completions", &body, &[]), 400, "invalid_logprobs");
}

#[test]
fn bad_schemas_get_a_400_that_names_the_problem_in_chat_extract_and_profiles() {
    let adapters_dir = adapter_dir("lm-qv-r4").parent().unwrap().to_path_buf();
    let server = Server::start(&["--adapters-dir", adapters_dir.to_str().unwrap()]);
    let chat = |schema: Value| {
        server.post_json("/v1/chat/completions", &with_format(chat_body(None, &[], "hi", 4), json_schema_format(schema)), &[])
    };
    let named = |reply: (u16, Value), needle: &str| {
        assert_api_error(&reply, 400, "invalid_schema");
        let message = parse::<ErrorResponse>(&reply.1).error.message;
        assert!(message.contains(needle), "{message}");
    };
    named(chat(json!({ "type": "strng" })), "strng");
    named(chat(json!({ "type": "array", "uniqueItems": true })), "uniqueItems");
    named(chat(json!({ "type": "string", "format": "bogus" })), "bogus");
    let unknown_format =
        server.post_json("/v1/chat/completions", &with_format(chat_body(None, &[], "hi", 4), json!({ "type": "xml" })), &[]);
    assert_api_error(&unknown_format, 400, "invalid_json");

    let plate = image_bytes("plate.png");
    named(server.extract_multipart(&[("image", "p.png", &plate)], &[("schema", "{not json")], &[]), "not JSON");
    named(server.extract_multipart(&[("image", "p.png", &plate)], &[("schema", r#"{"not": {}}"#), ("strict", "true")], &[]), "not");

    let load = |extra: Value| {
        let mut body = json!({ "name": "plates", "path": "lm-qv-r4" });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        server.post_json("/v1/adapters", &body, &[])
    };
    named(load(json!({ "schema": { "type": "object", "properties": { "a": { "type": "strng" } } } })), "strng");
    assert!(server.get("/v1/adapters").1.contains("\"data\":[]"), "a refused profile loads nothing");
    let (status, body) = load(json!({ "schema": plate_schema(), "max_tokens": 64 }));
    assert_eq!(status, 201, "{body}");
    let (status, body) = server.extract_multipart(&[("image", "p.png", &plate)], &[], &[("X-Adapter", "plates")]);
    assert_eq!(status, 200, "{body}");
    assert_valid_extraction(&body, &plate_schema(), "runtime profile");

    // At start-up, a bad profile schema stops the server with the file and the reason.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.json"), r#"{"type": "object", "properties": {"a": {"type": "strng"}}}"#).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("[adapters.x]\npath = {:?}\nschema_file = \"bad.json\"\n", adapter_dir("lm-qv-r4").display().to_string()),
    )
    .unwrap();
    let out = qwen_ocr(&["serve", "--model", &tiny_model(), "--host", "127.0.0.1", "--port", "0", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("adapter `x`") && stderr.contains("strng"), "{stderr}");
}

/// A schema whose only answers break a keyword the grammar cannot enforce: two items from a
/// one-value enum, which `uniqueItems` forbids.
fn pair_schema() -> Value {
    json!({ "type": "array", "items": { "enum": ["a"] }, "minItems": 2, "maxItems": 2, "uniqueItems": true })
}

/// A JSON POST with the response's `x-qwen-ocr-schema-relaxed` header.
fn post_with_header(server: &Server, path: &str, body: &Value) -> (u16, Value, Option<String>) {
    let response = match ureq::post(&server.url(path)).set("content-type", "application/json").send_string(&body.to_string()) {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let header = response.header("x-qwen-ocr-schema-relaxed").map(str::to_string);
    let status = response.status();
    (status, serde_json::from_str(&response.into_string().unwrap()).unwrap(), header)
}

#[test]
fn strict_refuses_what_non_strict_relaxes_reports_and_checks_in_chat_extract_and_profiles() {
    let adapters_dir = adapter_dir("lm-qv-r4").parent().unwrap().to_path_buf();
    let server = Server::start(&["--adapters-dir", adapters_dir.to_str().unwrap()]);
    let chat = |strict: Option<bool>| {
        let mut format = json!({ "type": "json_schema", "json_schema": { "name": "pair", "schema": pair_schema() } });
        if let Some(strict) = strict {
            format["json_schema"]["strict"] = json!(strict);
        }
        with_format(chat_body(None, &[], "hi", 16), format)
    };
    let (status, body, _) = post_with_header(&server, "/v1/chat/completions", &chat(Some(true)));
    assert_api_error(&(status, body.clone()), 400, "invalid_schema");
    let message = parse::<ErrorResponse>(&body).error.message;
    assert!(message.contains("`uniqueItems` at /uniqueItems") && message.contains("strict"), "{message}");

    for strict in [None, Some(false)] {
        let (status, body, header) = post_with_header(&server, "/v1/chat/completions", &chat(strict));
        assert_eq!(status, 200, "{body}");
        assert_eq!(header.as_deref(), Some("uniqueItems"));
        let reply: ChatCompletion = parse(&body);
        assert_eq!(reply.choices[0].message.content, r#"["a","a"]"#);
        let relaxed = reply.schema.schema_relaxed.unwrap();
        assert_eq!(
            (relaxed.len(), relaxed[0].keyword.as_str(), relaxed[0].path.as_str(), relaxed[0].checked),
            (1, "uniqueItems", "/uniqueItems", true)
        );
        assert_eq!(reply.schema.schema_valid, Some(false));
        assert!(reply.schema.schema_errors[0].contains("unique"), "{:?}", reply.schema.schema_errors);
    }
    // Streamed: the finish chunk carries the report.
    let mut streamed = chat(None);
    streamed["stream"] = json!(true);
    let (text, finish, lines) = server.chat_stream(&streamed, &[]);
    assert_eq!((text.as_str(), finish.as_deref()), (r#"["a","a"]"#, Some("stop")));
    let reports: Vec<ChatCompletionChunk> = lines
        .iter()
        .filter(|l| *l != "[DONE]")
        .map(|l| parse_str::<ChatCompletionChunk>(l))
        .filter(|c| c.schema.schema_valid.is_some())
        .collect();
    assert_eq!(reports.len(), 1, "{lines:?}");
    assert!(reports[0].choices[0].finish_reason.is_some() && reports[0].schema.schema_valid == Some(false));
    // A schema the grammar enforces whole: nothing relaxed, no header, and the answer passes.
    let (status, body, header) =
        post_with_header(&server, "/v1/chat/completions", &with_format(chat_body(None, &[], "hi", 64), json_schema_format(plate_schema())));
    assert_eq!((status, header), (200, None), "{body}");
    let reply: ChatCompletion = parse(&body);
    assert_eq!((reply.schema.schema_relaxed, reply.schema.schema_valid), (Some(vec![]), Some(true)));
    // Without a schema, no report at all.
    let (_, body, _) = post_with_header(&server, "/v1/chat/completions", &chat_body(None, &[], "hi", 2));
    assert!(body.get("schema_valid").is_none() && body.get("schema_relaxed").is_none(), "{body}");

    // /v1/extract: not strict unless asked; a failed check keeps the answer and says why.
    let plate = image_bytes("plate.png");
    let schema = pair_schema().to_string();
    let (status, body) = server.extract_multipart(&[("image", "p.png", &plate)], &[("schema", &schema)], &[]);
    assert_eq!(status, 200, "{body}");
    let extraction: Extraction = parse(&body);
    assert_eq!(extraction.data, json!(["a", "a"]));
    assert!(extraction.error.as_deref().is_some_and(|e| e.contains("full schema check") && e.contains("unique")), "{body}");
    assert_eq!(extraction.schema.schema_valid, Some(false));
    let strict = server.extract_multipart(&[("image", "p.png", &plate)], &[("schema", &schema), ("strict", "true")], &[]);
    assert_api_error(&strict, 400, "invalid_schema");
    assert_api_error(
        &server.extract_multipart(&[("image", "p.png", &plate)], &[("schema", &schema), ("strict", "yes")], &[]),
        400,
        "invalid_field",
    );

    // Profiles: `strict` refuses the schema at load; without it the adapter loads and reports.
    let load = |strict: bool| {
        server.post_json(
            "/v1/adapters",
            &json!({ "name": "pairs", "path": "lm-qv-r4", "schema": pair_schema(), "strict": strict, "max_tokens": 16 }),
            &[],
        )
    };
    assert_api_error(&load(true), 400, "invalid_schema");
    assert_eq!(load(false).0, 201);
    let (status, body) = server.extract_multipart(&[("image", "p.png", &plate)], &[], &[("X-Adapter", "pairs")]);
    assert_eq!(status, 200, "{body}");
    let extraction: Extraction = parse(&body);
    assert_eq!(extraction.schema.schema_relaxed.unwrap()[0].keyword, "uniqueItems");

    // At start-up, `strict = true` on a profile stops the server with the keyword.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pair.json"), pair_schema().to_string()).unwrap();
    let config = dir.path().join("c.toml");
    let toml =
        format!("[adapters.x]\npath = {:?}\nschema_file = \"pair.json\"\nstrict = true\n", adapter_dir("lm-qv-r4").display().to_string());
    std::fs::write(&config, toml).unwrap();
    let out = qwen_ocr(&["serve", "--model", &tiny_model(), "--host", "127.0.0.1", "--port", "0", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("adapter `x`") && stderr.contains("uniqueItems"), "{stderr}");
}

/// Each format the grammar enforces, written by the model several times, checked by Python's
/// `jsonschema` with its format checker (`tests/schema_formats.py`). Python comes from
/// `QWEN_OCR_PYTHON`, as for the openai client test; without `jsonschema` it skips, except
/// under CI.
#[test]
fn every_enforced_format_writes_values_pythons_jsonschema_accepts() {
    const FORMATS: [&str; 11] =
        ["date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri", "uri-reference"];
    let python = std::env::var("QWEN_OCR_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_jsonschema = std::process::Command::new(&python).args(["-c", "import jsonschema"]).output().is_ok_and(|o| o.status.success());
    if !has_jsonschema {
        assert!(std::env::var_os("CI").is_none(), "CI must provide jsonschema: set QWEN_OCR_PYTHON to a Python that has it");
        eprintln!("skipped: no `jsonschema` for {python}; `pip install 'jsonschema[format-nongpl]'` and set QWEN_OCR_PYTHON to run it");
        return;
    }
    let server = Server::start(&[]);
    let prompts = ["Write it.", "Another one, please."];
    let jobs: Vec<(&str, &str)> = FORMATS.iter().flat_map(|f| prompts.iter().map(move |p| (*f, *p))).collect();
    // All at once, so that the engine batches them.
    let answers: Vec<(&str, Value)> = std::thread::scope(|s| {
        let server = &server;
        let handles: Vec<_> = jobs
            .iter()
            .map(|&(format, prompt)| {
                let schema = json!({ "type": "string", "format": format });
                let body = with_format(chat_body(None, &[], &format!("A {format}. {prompt}"), 512), json_schema_format(schema));
                (format, s.spawn(move || server.post_json("/v1/chat/completions", &body, &[])))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|(format, handle)| {
                let (status, body) = handle.join().unwrap();
                assert_eq!(status, 200, "{format}: {body}");
                let reply: ChatCompletion = parse(&body);
                assert_eq!(reply.schema.schema_relaxed, Some(vec![]), "{format} is enforced, not relaxed");
                let choice = &reply.choices[0];
                (choice.finish_reason == FinishReason::Stop).then(|| (format, serde_json::from_str(&choice.message.content).unwrap()))
            })
            .collect()
    });
    for format in FORMATS {
        let values: Vec<Value> = answers.iter().filter(|(f, _)| *f == format).map(|(_, v)| v.clone()).collect();
        assert!(values.len() >= 2, "{format}: only {} answers finished", values.len());
        let job = json!({ "schema": { "type": "string", "format": format }, "answers": values, "formats": [format] });
        let mut child = std::process::Command::new(&python)
            .arg(fixtures().join("../schema_formats.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(job.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{format}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
}
