//! A bulk run's requests: `/v1/extract` on the local server or on `--server`, the same either
//! way, and their answers as result lines.

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use crate::api::error::ErrorResponse;
use crate::api::extract::{Extraction, PageExtraction};

use super::journal::{Line, Status};

/// A busy server (429, 503) is asked again after its `Retry-After`, this many times.
const RETRIES: u32 = 120;

pub struct Client {
    /// `http://host:port` (no trailing slash).
    pub base: String,
    pub api_key: Option<String>,
    /// Sent as `X-Adapter`.
    pub adapter: Option<String>,
    /// Form fields every request carries (prompt, schema, pixel bounds).
    pub fields: Vec<(&'static str, String)>,
}

impl Client {
    /// Reads one image: its line.
    pub fn image(&self, file: &str, bytes: &[u8]) -> Line {
        let response = match self.post(file, bytes, "application/octet-stream", &[]) {
            Ok(response) => response,
            Err(error) => return Line::failed(file, None, error),
        };
        let body = read_text(response);
        match serde_json::from_str::<Extraction>(&body) {
            Ok(e) => Line {
                file: file.to_string(),
                page: None,
                status: Status::Ok,
                data: e.data,
                raw: Some(e.raw),
                confidence: e.confidence,
                boxes: e.boxes,
                usage: Some(e.usage),
                error: e.error,
            },
            Err(e) => Line::failed(file, None, format!("the server's answer is not an extraction ({e}): {body}")),
        }
    }

    /// Reads `pages` of a PDF, streamed: `each` gets every page's line as it finishes (pages
    /// the answer left out fail).
    pub fn pages(&self, file: &str, bytes: &[u8], pages: &[u32], mut each: impl FnMut(Line)) {
        let list = pages.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let mut left: Vec<u32> = pages.to_vec();
        let response = match self.post(file, bytes, "application/pdf", &[("pages", list), ("stream", "true".into())]) {
            Ok(response) => response,
            Err(error) => {
                pages.iter().for_each(|&page| each(Line::failed(file, Some(page), error.clone())));
                return;
            }
        };
        for text in BufReader::new(response.into_reader()).lines() {
            let Ok(text) = text else { break };
            let Some(data) = text.strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                break;
            }
            let Ok(result) = serde_json::from_str::<PageExtraction>(data) else { continue };
            left.retain(|&p| p != result.page);
            each(page_line(file, result));
        }
        for page in left {
            each(Line::failed(file, Some(page), "the answer ended before this page's result"));
        }
    }

    /// POSTs the file and the fields as a form, asking again while the server is busy; an
    /// answer other than 200 is the error it says.
    fn post(&self, name: &str, bytes: &[u8], content_type: &str, extra: &[(&str, String)]) -> Result<ureq::Response, String> {
        let boundary = format!("qwen-ocr-{}", uuid::Uuid::new_v4().simple());
        let body = form(
            &boundary,
            name,
            bytes,
            content_type,
            self.fields.iter().map(|(k, v)| (*k, v.as_str())).chain(extra.iter().map(|(k, v)| (*k, v.as_str()))),
        );
        let url = format!("{}/v1/extract", self.base);
        for attempt in 0.. {
            let mut request = ureq::post(&url).set("content-type", &format!("multipart/form-data; boundary={boundary}"));
            if let Some(key) = &self.api_key {
                request = request.set("authorization", &format!("Bearer {key}"));
            }
            if let Some(adapter) = &self.adapter {
                request = request.set("x-adapter", adapter);
            }
            match request.send_bytes(&body) {
                Ok(response) => return Ok(response),
                Err(ureq::Error::Status(status @ (429 | 503), response)) if attempt < RETRIES => {
                    let wait = response.header("retry-after").and_then(|s| s.parse().ok()).unwrap_or(1u64);
                    tracing::debug!(status, wait, "the server is busy; asking again");
                    std::thread::sleep(Duration::from_secs(wait.clamp(1, 60)));
                }
                Err(ureq::Error::Status(status, response)) => {
                    let body = read_text(response);
                    return Err(match serde_json::from_str::<ErrorResponse>(&body) {
                        Ok(e) => format!("{} ({status} {})", e.error.message, e.error.code),
                        Err(_) => format!("the server answered {status}: {body}"),
                    });
                }
                Err(e) => return Err(format!("the server could not be reached: {e}")),
            }
        }
        unreachable!("the loop returns")
    }
}

/// A page's result as a line: `ok` when it went through the model.
fn page_line(file: &str, page: PageExtraction) -> Line {
    if page.finish_reason.is_none() {
        return Line::failed(file, Some(page.page), page.error.unwrap_or_else(|| "the page failed".into()));
    }
    Line {
        file: file.to_string(),
        page: Some(page.page),
        status: Status::Ok,
        data: page.data,
        raw: Some(page.raw),
        confidence: page.confidence,
        boxes: page.boxes,
        usage: Some(page.usage),
        error: page.error,
    }
}

fn form<'a>(boundary: &str, name: &str, bytes: &[u8], content_type: &str, fields: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
    // The file name only labels the part: quotes and line breaks in it would break the form.
    let filename: String = name.chars().map(|c| if c == '"' || c.is_control() { '_' } else { c }).collect();
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend(b"\r\n");
    for (key, value) in fields {
        body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n").as_bytes());
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    body
}

fn read_text(response: ureq::Response) -> String {
    let mut text = String::new();
    let _ = response.into_reader().read_to_string(&mut text);
    text
}
