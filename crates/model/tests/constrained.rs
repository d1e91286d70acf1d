//! Constrained decoding and log-probabilities on the tiny checkpoint in the exact mode. Its
//! random weights never write JSON on their own, so valid JSON here is the grammar's doing.

use std::path::{Path, PathBuf};

use qwen_ocr_model::decoding::grammar::GrammarState;
use qwen_ocr_model::decoding::sampling::SamplingParams;
use qwen_ocr_model::preprocess::image::ImageOptions;
use qwen_ocr_model::preprocess::prompt::ChatMessage;
use qwen_ocr_model::quality::next_token_logprobs;
use qwen_ocr_model::{FinishReason, GenerateRequest, LoadOptions, Pipeline};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn request(pipeline: &Pipeline, image: &str, max_new: usize) -> GenerateRequest {
    let image = pipeline.preprocess_file(&fixtures().join("images").join(image), &ImageOptions::default()).unwrap();
    GenerateRequest {
        messages: vec![ChatMessage::user_with_images(1, "Read the plate and answer in JSON.")],
        images: vec![image],
        max_new_tokens: Some(max_new),
        ..Default::default()
    }
}

fn plate_schema() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("schemas/plate.schema.json")).unwrap()).unwrap()
}

#[test]
fn greedy_logprobs_match_a_direct_softmax_of_the_models_logits() {
    let pipeline = Pipeline::load(fixtures().join("tiny-tied").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let mut req = request(&pipeline, "plate.png", 6);
    req.top_logprobs = Some(5);
    let out = pipeline.generate(&req).unwrap();
    assert_eq!(out.logprobs.len(), out.token_ids.len());

    // The same prompt and tokens through the model one at a time, softmax by candle.
    let direct = next_token_logprobs(&pipeline, &req, &out.token_ids[..out.token_ids.len() - 1]).unwrap().to_vec2::<f32>().unwrap();
    for (step, (entry, row)) in out.logprobs.iter().zip(&direct).enumerate() {
        assert_eq!(entry.token, out.token_ids[step]);
        assert_eq!(entry.top.len(), 5);
        assert_eq!(entry.top[0], (entry.token, entry.logprob), "step {step}: greedy picks the top-1 entry");
        assert!(entry.top.windows(2).all(|w| w[0].1 >= w[1].1), "step {step}: sorted");
        for &(token, logprob) in &entry.top {
            assert!((logprob - row[token as usize]).abs() < 1e-4, "step {step}, token {token}: {logprob} vs {}", row[token as usize]);
        }
        assert_eq!(entry.choice_logprob, entry.logprob, "step {step}: unconstrained, every token was possible");
    }
}

#[test]
fn a_constrained_sequence_shares_a_batch_and_the_others_keep_their_solo_tokens() {
    let pipeline = Pipeline::load(fixtures().join("tiny-tied").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let schema = plate_schema();
    let mut constrained = request(&pipeline, "plate.png", 64);
    constrained.grammar = Some(pipeline.vocabulary().unwrap().compile(&schema).unwrap());
    constrained.top_logprobs = Some(0);
    let free = request(&pipeline, "plate.png", 12);
    let other = request(&pipeline, "gray.png", 9);

    let batch = pipeline.generate_batch(&[free.clone(), constrained.clone(), other.clone()]).unwrap();
    assert_eq!(batch[0].token_ids, pipeline.generate(&free).unwrap().token_ids);
    assert_eq!(batch[2].token_ids, pipeline.generate(&other).unwrap().token_ids);
    assert!(serde_json::from_str::<Value>(&pipeline.generate(&free).unwrap().text).is_err(), "the model alone writes no JSON");

    let answer = &batch[1];
    assert_eq!(answer.finish_reason, FinishReason::Stop, "{}", answer.text);
    let data: Value = serde_json::from_str(&answer.text).unwrap();
    let plate = data["plate"].as_str().unwrap();
    assert!(plate.len() == 4 && plate[..2].bytes().all(|b| b.is_ascii_uppercase()) && plate[2..].bytes().all(|b| b.is_ascii_digit()));
    assert!((1990..=2030).contains(&data["year"].as_i64().unwrap()));
    assert!(["red", "blue", "white"].contains(&data["color"].as_str().unwrap()));
    assert_eq!(data.as_object().unwrap().len(), 3);
    assert!(!answer.text.contains(' '), "compact JSON: {}", answer.text);
    // Keys and punctuation are forced; the model chose at least the values.
    let forced = answer.logprobs.iter().filter(|l| l.choice_logprob == 0.0).count();
    assert!(forced > 0 && forced < answer.logprobs.len(), "{:?}", answer.logprobs);
    assert_eq!(pipeline.generate(&constrained).unwrap().token_ids, answer.token_ids, "constrained tokens are the same alone");
}

#[test]
fn a_schema_that_cannot_be_enforced_is_refused() {
    let pipeline = Pipeline::load(fixtures().join("tiny-tied").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let vocabulary = pipeline.vocabulary().unwrap();
    for (schema, needle) in
        [(json!({ "type": "strng" }), "strng"), (json!({ "type": "array", "uniqueItems": true }), "uniqueItems"), (json!(3), "object")]
    {
        let error = vocabulary.compile(&schema).unwrap_err().to_string();
        assert!(error.contains(needle), "{schema}: {error}");
    }
}

#[test]
fn the_mask_never_allows_special_vision_or_padding_tokens_and_ends_on_either_end_token() {
    let pipeline = Pipeline::load(fixtures().join("tiny-tied").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let grammar = pipeline.vocabulary().unwrap().compile(&json!({ "type": "string", "maxLength": 3 })).unwrap();
    let tokenizer = pipeline.prompt.tokenizer();
    let id = |t: &str| tokenizer.token_to_id(t).unwrap() as usize;
    let width = pipeline.model.config().text.vocab_size;
    assert!(width > pipeline.vocabulary().unwrap().len(), "the logits are wider than the vocabulary");

    let mut state = GrammarState::new(&grammar);
    let mut logits = vec![1.0f32; width];
    state.mask(&mut logits);
    let allowed: Vec<usize> = (0..width).filter(|&i| logits[i].is_finite()).collect();
    assert!(allowed.contains(&id("\"")), "a string starts with a quote");
    for special in ["<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|image_pad|>", "<|im_start|>"] {
        assert!(!allowed.contains(&id(special)), "{special} allowed at the start");
    }
    assert!(allowed.iter().all(|&i| i < pipeline.vocabulary().unwrap().len()), "no padding row allowed");

    // After a complete string only the end is possible, and both end tokens are.
    for token in tokenizer.encode("\"ab\"", false).unwrap().get_ids() {
        state.accept(*token);
    }
    let mut logits = vec![1.0f32; width];
    state.mask(&mut logits);
    let allowed: Vec<usize> = (0..width).filter(|&i| logits[i].is_finite()).collect();
    let mut ends = vec![id("<|im_end|>"), id("<|endoftext|>")];
    ends.sort();
    assert_eq!(allowed, ends);
}

#[test]
fn forced_tokens_share_a_pass_and_change_nothing_else() {
    let mut pipeline = Pipeline::load(fixtures().join("tiny-tied").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let grammar = pipeline.vocabulary().unwrap().compile(&plate_schema()).unwrap();
    let mut plain = request(&pipeline, "plate.png", 64);
    plain.grammar = Some(grammar);
    let scored = GenerateRequest { top_logprobs: Some(3), ..plain.clone() };
    // "year" is a key the grammar forces: the stop string falls inside a forced run.
    let stopped = GenerateRequest { stop: vec!["year".into()], ..plain.clone() };
    let free = request(&pipeline, "gray.png", 9);
    // A seeded sampler takes the draw a forced token would have had.
    let sampling = SamplingParams { temperature: 0.9, seed: Some(11), ..SamplingParams::default() };
    let sampled = GenerateRequest { sampling, ..plain.clone() };
    let requests = [plain, scored, stopped, free, sampled];

    pipeline.fast_forward = false;
    let one_by_one = pipeline.generate_batch(&requests).unwrap();
    pipeline.fast_forward = true;
    let together = pipeline.generate_batch(&requests).unwrap();

    for (i, (a, b)) in one_by_one.iter().zip(&together).enumerate() {
        assert_eq!((&a.token_ids, &a.text, a.finish_reason), (&b.token_ids, &b.text, b.finish_reason), "request {i}");
        assert_eq!(a.forward_passes, a.token_ids.len(), "request {i}: one pass a token without fast-forward");
    }
    assert_eq!(together[0].finish_reason, FinishReason::Stop, "{}", together[0].text);
    assert!(
        together[0].forward_passes < together[0].token_ids.len(),
        "{} passes for {} tokens",
        together[0].forward_passes,
        together[0].token_ids.len()
    );
    assert!(together[2].text.ends_with(",\"") && together[2].forward_passes < together[2].token_ids.len(), "{}", together[2].text);
    assert_eq!(together[3].forward_passes, together[3].token_ids.len(), "an unconstrained request is unchanged");
    assert!(together[4].forward_passes < together[4].token_ids.len(), "{}", together[4].text);
    // Forced tokens' log-probabilities come from the rows of the pass that ran them.
    let (a, b) = (&one_by_one[1].logprobs, &together[1].logprobs);
    assert_eq!(a.len(), b.len());
    for (step, (a, b)) in a.iter().zip(b).enumerate() {
        assert_eq!((a.token, a.choice_logprob == 0.0), (b.token, b.choice_logprob == 0.0), "step {step}");
        assert!((a.logprob - b.logprob).abs() < 1e-4 && (a.choice_logprob - b.choice_logprob).abs() < 1e-4, "step {step}: {a:?} vs {b:?}");
        let tops = |l: &qwen_ocr_model::decoding::logprobs::TokenLogprob| l.top.iter().map(|t| t.0).collect::<Vec<_>>();
        assert_eq!(tops(a), tops(b), "step {step}");
    }
}
