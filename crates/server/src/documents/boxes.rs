//! Bounding boxes the model wrote, moved from the model's coordinates onto the caller's image:
//! the upload as it is shown (after its EXIF rotation), or the rendered page.
//!
//! Two formats: Qwen's special tokens,
//! `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, and JSON
//! objects with a `bbox_2d: [x1, y1, x2, y2]` (and a `label`). Each family writes them in its
//! own coordinates ([`BoxConvention`]); the README lists the sources.

use std::sync::LazyLock;

use qwen_ocr_model::Family;
use regex::Regex;
use serde_json::Value;

/// The coordinates a model family writes boxes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoxConvention {
    /// 0-1000 across the image the model saw, so across the original too (a resize scales both
    /// alike): Qwen2-VL and Qwen3-VL.
    Relative1000,
    /// Pixels of the resized image the model saw: Qwen2.5-VL.
    ResizedPixels,
}

impl BoxConvention {
    /// The convention each family was trained on (sources in the README).
    pub fn of(family: Family) -> Self {
        match family {
            Family::Qwen2VL | Family::Qwen3VL => Self::Relative1000,
            Family::Qwen2_5VL => Self::ResizedPixels,
        }
    }
}

/// The image the caller sees and the size the model saw it at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// The caller's image in pixels: the upload after its EXIF rotation, or the rendered page.
    pub width: u32,
    pub height: u32,
    /// `[height, width]` after `smart_resize`: the model's input.
    pub resized: [usize; 2],
}

/// A box as the model wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenBox {
    pub label: Option<String>,
    /// `x1, y1, x2, y2` in the model's convention.
    pub corners: [f64; 4],
}

impl WrittenBox {
    /// The corners in the caller's pixels: scaled by the convention, kept inside the image,
    /// ordered so that x1 <= x2 and y1 <= y2, to 0.01 px.
    pub fn on(&self, geometry: &Geometry, convention: BoxConvention) -> [f64; 4] {
        let (width, height) = (geometry.width as f64, geometry.height as f64);
        let (sx, sy) = match convention {
            BoxConvention::Relative1000 => (width / 1000.0, height / 1000.0),
            BoxConvention::ResizedPixels => (width / geometry.resized[1] as f64, height / geometry.resized[0] as f64),
        };
        let [x1, y1, x2, y2] = self.corners;
        let place = |v: f64, scale: f64, limit: f64| ((v * scale).clamp(0.0, limit) * 100.0).round() / 100.0;
        let (x1, x2) = (place(x1, sx, width), place(x2, sx, width));
        let (y1, y2) = (place(y1, sy, height), place(y2, sy, height));
        [x1.min(x2), y1.min(y2), x1.max(x2), y1.max(y2)]
    }
}

static SPECIAL_TOKEN_SPAN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?s)<\|object_ref_start\|>(.*?)<\|object_ref_end\|>|<\|box_start\|>(.*?)<\|box_end\|>").expect("a valid pattern")
});
static CORNERS: LazyLock<Regex> = LazyLock::new(|| {
    let n = r"\s*(-?\d+(?:\.\d+)?)\s*";
    Regex::new(&format!(r"^\s*\({n},{n}\)\s*,?\s*\({n},{n}\)\s*$")).expect("a valid pattern")
});

/// Boxes in text decoded with its special tokens kept. Each box takes the label of the latest
/// `object_ref` before it (one reference may be followed by several boxes), as Qwen-VL's own
/// `draw_bbox_on_latest_picture` pairs them.
pub fn boxes_in_text(text: &str) -> Vec<WrittenBox> {
    let mut label = None;
    let mut boxes = Vec::new();
    for span in SPECIAL_TOKEN_SPAN.captures_iter(text) {
        if let Some(reference) = span.get(1) {
            label = Some(reference.as_str().trim().to_string());
        } else if let Some(corners) = span.get(2).and_then(|c| CORNERS.captures(c.as_str())) {
            let number = |i: usize| corners[i].parse::<f64>().unwrap_or(0.0);
            boxes.push(WrittenBox { label: label.clone(), corners: [number(1), number(2), number(3), number(4)] });
        }
    }
    boxes
}

/// Boxes in a JSON answer: every object, at any depth, with a `bbox_2d` of four numbers; its
/// `label` (a string, or any scalar written out) names it.
pub fn boxes_in_json(value: &Value) -> Vec<WrittenBox> {
    let mut boxes = Vec::new();
    collect_json_boxes(value, &mut boxes);
    boxes
}

fn collect_json_boxes(value: &Value, boxes: &mut Vec<WrittenBox>) {
    match value {
        Value::Object(object) => {
            let corners = object.get("bbox_2d").and_then(Value::as_array).filter(|a| a.len() == 4);
            if let Some(corners) = corners.and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>()) {
                let label = object.get("label").and_then(|l| match l {
                    Value::String(s) => Some(s.clone()),
                    Value::Null | Value::Array(_) | Value::Object(_) => None,
                    other => Some(other.to_string()),
                });
                boxes.push(WrittenBox { label, corners: [corners[0], corners[1], corners[2], corners[3]] });
            }
            object.values().for_each(|v| collect_json_boxes(v, boxes));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_json_boxes(v, boxes)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_token_boxes_take_the_latest_reference() {
        let text = "The <|object_ref_start|>plate<|object_ref_end|> is at <|box_start|>(100,200),(300,400)<|box_end|> \
                    and <|box_start|>(1, 2) , (3,4)<|box_end|>; <|box_start|>(broken)<|box_end|>\
                    <|object_ref_start|> car <|object_ref_end|><|box_start|>(5.5,6),(7,8)<|box_end|><|im_end|>";
        let boxes = boxes_in_text(text);
        let labels: Vec<_> = boxes.iter().map(|b| b.label.as_deref()).collect();
        assert_eq!(labels, [Some("plate"), Some("plate"), Some("car")]);
        assert_eq!(boxes[0].corners, [100.0, 200.0, 300.0, 400.0]);
        assert_eq!(boxes[1].corners, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(boxes[2].corners, [5.5, 6.0, 7.0, 8.0]);
        assert_eq!(boxes_in_text("<|box_start|>(1,2),(3,4)<|box_end|>")[0].label, None);
    }

    /// The box tokens are special tokens: what `raw` holds (decoded without them) has no boxes,
    /// the same ids decoded with them (as the server decodes for boxes) have them.
    #[test]
    fn box_tokens_are_found_only_when_the_decoding_keeps_special_tokens() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-tied/tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(path).unwrap();
        let text = "Here: <|object_ref_start|>engine number<|object_ref_end|><|box_start|>(120,340),(560,410)<|box_end|>";
        let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        for special in ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"] {
            assert!(ids.contains(&tokenizer.token_to_id(special).unwrap()), "{special} is one token");
        }
        assert!(boxes_in_text(&tokenizer.decode(&ids, true).unwrap()).is_empty());
        let boxes = boxes_in_text(&tokenizer.decode(&ids, false).unwrap());
        assert_eq!(boxes, [WrittenBox { label: Some("engine number".into()), corners: [120.0, 340.0, 560.0, 410.0] }]);
    }

    #[test]
    fn json_boxes_are_found_at_any_depth() {
        let answer = serde_json::json!({
            "plate": {"bbox_2d": [10, 20, 30, 40], "label": "plate", "text": "MA3"},
            "others": [{"bbox_2d": [1.5, 2, 3, 4], "label": 7}, {"bbox_2d": [1, 2, 3]}, {"bbox_2d": ["a", 2, 3, 4]}],
        });
        let mut boxes = boxes_in_json(&answer);
        boxes.sort_by(|a, b| a.corners[0].total_cmp(&b.corners[0]));
        assert_eq!(boxes.len(), 2);
        assert_eq!((boxes[0].label.as_deref(), boxes[0].corners), (Some("7"), [1.5, 2.0, 3.0, 4.0]));
        assert_eq!((boxes[1].label.as_deref(), boxes[1].corners), (Some("plate"), [10.0, 20.0, 30.0, 40.0]));
    }

    #[test]
    fn each_convention_maps_onto_the_callers_pixels() {
        // A 600 x 800 (w x h) image the model saw resized to 448 x 588 (w x h).
        let geometry = Geometry { width: 600, height: 800, resized: [588, 448] };
        let relative = WrittenBox { label: None, corners: [500.0, 250.0, 100.0, 750.0] };
        assert_eq!(relative.on(&geometry, BoxConvention::Relative1000), [60.0, 200.0, 300.0, 600.0]);
        let pixels = WrittenBox { label: None, corners: [224.0, 294.0, 448.0, 600.0] };
        assert_eq!(pixels.on(&geometry, BoxConvention::ResizedPixels), [300.0, 400.0, 600.0, 800.0], "clamped to the image");
        let thirds = WrittenBox { label: None, corners: [1.0, 1.0, 2.0, 2.0] };
        assert_eq!(
            thirds.on(&Geometry { width: 100, height: 100, resized: [3, 3] }, BoxConvention::ResizedPixels),
            [33.33, 33.33, 66.67, 66.67]
        );
    }
}
