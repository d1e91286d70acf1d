//! What the benches share: settings from the environment, medians, the seed task's prompt.

#![allow(dead_code)]

/// The prompt of the users' seed script.
pub const SEED_PROMPT: &str =
    "Please extract the Vehicle Sr No, Engine No, and Model from this image. Response only json format nothing else.";

pub fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
