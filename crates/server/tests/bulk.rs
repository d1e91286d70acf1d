//! `qwen-ocr extract` on the tiny checkpoint: a folder of images and PDFs in, one JSON line per
//! image or page out; a corrupt file fails on its own line, and a run stopped half-way resumes.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use serde_json::Value;

const PROMPT: &str = "Read it.";
const FIELDS: [&str; 9] = ["file", "page", "status", "data", "raw", "confidence", "boxes", "usage", "error"];

/// A folder: two photos (one in a subfolder), a corrupt image, a two-page PDF and a cut-off one.
fn inputs(root: &Path) {
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::copy(image_path("plate.png"), root.join("plate.png")).unwrap();
    std::fs::copy(image_path("photo.jpg"), root.join("sub/photo.jpg")).unwrap();
    std::fs::write(root.join("corrupt.jpg"), b"\xff\xd8\xff\xe0 not really a JPEG").unwrap();
    std::fs::write(root.join("sub/two.pdf"), common::pdf::document(2)).unwrap();
    let whole = common::pdf::document(2);
    std::fs::write(root.join("cut.pdf"), &whole[..whole.len() / 2]).unwrap();
}

fn extract(out: &Path, extra: &[&str], inputs: &[&Path]) -> std::process::Output {
    let (model, out) = (tiny_model(), out.display().to_string());
    let mut args = vec!["extract", "--model", &model, "--prompt", PROMPT, "--max-tokens", "4", "--concurrency", "3", "--out", &out];
    args.extend(extra);
    let inputs: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    args.extend(inputs.iter().map(String::as_str));
    qwen_ocr(&args)
}

/// The results by `(file relative to root, page)`, each line checked for every field.
fn results(out: &Path, root: &Path) -> BTreeMap<(String, Option<u64>), Value> {
    let text = std::fs::read_to_string(out).unwrap();
    let mut by_item = BTreeMap::new();
    for line in text.lines() {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in FIELDS {
            assert!(value.get(field).is_some(), "no `{field}`: {line}");
        }
        let file = Path::new(value["file"].as_str().unwrap()).strip_prefix(root).unwrap().display().to_string();
        let previous = by_item.insert((file, value["page"].as_u64()), value);
        assert!(previous.is_none(), "one line per item: {text}");
    }
    by_item
}

fn statuses(results: &BTreeMap<(String, Option<u64>), Value>) -> Vec<(String, Option<u64>, String)> {
    results.iter().map(|((file, page), v)| (file.clone(), *page, v["status"].as_str().unwrap().to_string())).collect()
}

fn item(file: &str, page: Option<u64>, status: &str) -> (String, Option<u64>, String) {
    (file.to_string(), page, status.to_string())
}

#[test]
fn a_folder_gives_one_line_per_image_or_page_survives_a_corrupt_file_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("in");
    inputs(&root);
    let out = dir.path().join("results.jsonl");

    let run = extract(&out, &[], &[&root]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("4 ok, 2 failed, 0 already done before"), "{stderr}");
    let first = results(&out, &root);
    assert_eq!(
        statuses(&first),
        [
            item("corrupt.jpg", None, "failed"),
            item("cut.pdf", None, "failed"),
            item("plate.png", None, "ok"),
            item("sub/photo.jpg", None, "ok"),
            item("sub/two.pdf", Some(1), "ok"),
            item("sub/two.pdf", Some(2), "ok"),
        ]
    );
    // What the server would answer is what `generate` writes.
    let plate = &first[&("plate.png".to_string(), None)];
    assert_eq!(plate["raw"], generate_text("plate.png", PROMPT, 4, None));
    assert_eq!(plate["usage"]["completion_tokens"], 4);
    assert!(first[&("cut.pdf".to_string(), None)]["error"].as_str().unwrap().contains("truncated"));
    assert!(first[&("corrupt.jpg".to_string(), None)]["data"].is_null());

    // A run stopped after three lines, the fourth half-written; meanwhile the corrupt file was
    // replaced by a good one.
    let text = std::fs::read_to_string(&out).unwrap();
    let kept: Vec<&str> = text.lines().take(3).collect();
    let done_before = kept.iter().filter(|l| l.contains("\"status\":\"ok\"")).count();
    std::fs::write(&out, format!("{}\n{}", kept.join("\n"), &text.lines().nth(3).unwrap()[..20])).unwrap();
    std::fs::copy(image_path("gray.png"), root.join("corrupt.jpg")).unwrap();
    let run = extract(&out, &[], &[&root]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("{done_before} already done before")), "{stderr}");
    let resumed = results(&out, &root);
    assert_eq!(statuses(&resumed)[0], item("corrupt.jpg", None, "ok"), "the failed item was tried again");
    assert_eq!(statuses(&resumed)[1], item("cut.pdf", None, "failed"));
    assert_eq!(resumed.len(), 6);
    let now = std::fs::read_to_string(&out).unwrap();
    for line in kept.iter().filter(|l| l.contains("\"status\":\"ok\"")) {
        assert!(now.starts_with(line) || now.contains(&format!("\n{line}\n")), "ok lines are kept as they were");
    }
    for (key, value) in &first {
        if value["status"] == "ok" {
            assert_eq!(resumed[key]["raw"], value["raw"], "{key:?}");
        }
    }

    // Only the cut PDF is left to do, and it fails again: the run still succeeded overall.
    let run = extract(&out, &[], &[&root]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(results(&out, &root).len(), 6);
}

#[test]
fn nothing_processable_or_nothing_found_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("a.png"), b"nope").unwrap();
    let run = extract(&dir.path().join("out.jsonl"), &[], &[&bad]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("nothing could be processed"), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap().lines().count(), 1);

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let run = extract(&dir.path().join("out2.jsonl"), &[], &[&empty]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("no images or PDFs found"));
}

#[test]
fn a_server_gives_the_same_lines() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("in");
    inputs(&root);
    let local = dir.path().join("local.jsonl");
    assert!(extract(&local, &["--pages", "2"], &[&root]).status.success());

    let server = Server::start(&[]);
    let remote = dir.path().join("remote.jsonl");
    let run = extract(&remote, &["--pages", "2", "--server", &server.base], &[&root]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (local, remote) = (results(&local, &root), results(&remote, &root));
    assert_eq!(statuses(&remote), statuses(&local));
    assert!(local.contains_key(&("sub/two.pdf".to_string(), Some(2))) && !local.contains_key(&("sub/two.pdf".to_string(), Some(1))));
    for (key, value) in &local {
        for field in ["status", "data", "raw", "usage", "boxes"] {
            assert_eq!(remote[key][field], value[field], "{key:?} {field}");
        }
    }
}
