//! Pulling JSON out of model text. Models wrap answers in prose or code fences; the seed
//! script's greedy `({.*})` grabbed from the first `{` to the last `}`, which breaks on two
//! objects or a brace in trailing text. Here: a fenced ```json block first, else the first
//! balanced object or array that parses.

use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

static FENCED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?s)```[ \t]*(?:json|JSON)?[ \t]*\r?\n?(.*?)```").expect("valid regex"));

/// The JSON value in `text`, or why there is none.
pub fn extract_json(text: &str) -> Result<Value, String> {
    for block in FENCED.captures_iter(text) {
        if let Ok(value) = serde_json::from_str::<Value>(block[1].trim()) {
            if value.is_object() || value.is_array() {
                return Ok(value);
            }
        }
    }
    for (start, _) in text.char_indices().filter(|(_, c)| *c == '{' || *c == '[') {
        if let Some(end) = balanced_end(&text[start..]) {
            if let Ok(value) = serde_json::from_str::<Value>(&text[start..start + end]) {
                return Ok(value);
            }
        }
    }
    Err(if text.contains('{') || text.contains('[') {
        "the model's output contains no complete, valid JSON object or array".into()
    } else {
        "the model's output contains no JSON".into()
    })
}

/// Length of the bracketed value that `s` starts with, skipping brackets inside strings.
fn balanced_end(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prefers_a_fenced_block() {
        let text = "Here {not json}\n```json\n{\"a\": 1}\n```\nand {\"b\": 2}";
        assert_eq!(extract_json(text).unwrap(), json!({"a": 1}));
    }

    #[test]
    fn finds_the_first_balanced_value_in_prose() {
        assert_eq!(extract_json("Sure! {\"plate\": \"MH12 {AB}\"} and then {\"x\": 2}").unwrap(), json!({"plate": "MH12 {AB}"}));
        assert_eq!(extract_json("result: [1, {\"a\": \"]\"}] done").unwrap(), json!([1, {"a": "]"}]));
        assert_eq!(extract_json("{broken {\"ok\": true}").unwrap(), json!({"ok": true}));
        assert_eq!(extract_json("{\"a\": \"quote \\\" and } brace\"}").unwrap(), json!({"a": "quote \" and } brace"}));
    }

    /// Found by the `extract_json` fuzz target: serde_json's default float parsing read
    /// `6.666666666666667e+38` one ulp off, so `data` did not hold the number the model wrote.
    #[test]
    fn numbers_come_back_exactly() {
        assert_eq!(extract_json("[6.666666666666667e+38]").unwrap(), json!([6.666666666666667e38]));
        // The fuzzer's input: the number, read and written again, must read back the same.
        let found = extract_json(&format!("\u{3}*\0\0\0[{}0, \"\\ue009\"] `", "6".repeat(38))).unwrap();
        assert_eq!(extract_json(&found.to_string()).unwrap(), found);
    }

    #[test]
    fn says_why_when_there_is_none() {
        assert!(extract_json("no json here").unwrap_err().contains("no JSON"));
        assert!(extract_json("{\"a\": ").unwrap_err().contains("no complete"));
        assert!(extract_json("```json\nnot json\n```").is_err());
    }
}
