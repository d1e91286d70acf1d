//! PEFT LoRA adapters: loading and validating them against the loaded model, keeping them
//! resident by name, and folding one into the base weights.

pub mod lora;
pub mod merge;
pub mod registry;
