//! The qwen-ocr server as a library: the `qwen-ocr` binary is a thin `main` over [`cli::run`],
//! and the integration tests and fuzz targets reach the same types and parsers through here.

pub mod adapter_folder;
pub mod answer;
pub mod api;
pub mod bulk;
pub mod cli;
pub mod confidence;
pub mod config;
pub mod documents;
pub mod error;
pub mod extract_json;
pub mod http_server;
pub mod inference;
pub mod load_options;
pub mod logprobs;
pub mod metrics;
pub mod on_demand;
pub mod pixel_budget;
pub mod profile;
pub mod remote_image;
pub mod routes;
pub mod schema_report;
pub mod serve;
pub mod state;
