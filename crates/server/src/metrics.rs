//! Prometheus metrics: the recorder behind the `metrics` facade (the engine reports through
//! it too) and the per-request HTTP middleware.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "qwen_ocr_http_requests_total";
pub const HTTP_DURATION: &str = "qwen_ocr_http_request_duration_seconds";
pub const TIME_TO_FIRST_TOKEN: &str = "qwen_ocr_time_to_first_token_seconds";
pub const COMPLETION_TOKENS: &str = "qwen_ocr_completion_tokens_total";
pub const ADAPTER_LOADS: &str = "qwen_ocr_adapter_loads_total";
pub const ADAPTER_LOAD_SECONDS: &str = "qwen_ocr_adapter_load_seconds";
pub const ADAPTER_EVICTIONS: &str = "qwen_ocr_adapter_evictions_total";
pub const ADAPTERS_RESIDENT: &str = "qwen_ocr_adapters_resident";
pub const CONNECTIONS_OPEN: &str = "qwen_ocr_connections_open";
pub const CONNECTIONS_REFUSED: &str = "qwen_ocr_connections_refused_total";

/// The adapter that served a response, recorded by handlers for the metrics labels.
#[derive(Clone)]
pub struct AdapterLabel(pub String);

pub fn install() -> anyhow::Result<PrometheusHandle> {
    let seconds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
    let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full(TIME_TO_FIRST_TOKEN.into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full(ADAPTER_LOAD_SECONDS.into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full(qwen_ocr_scheduler::metrics::STEP_SECONDS.into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full(qwen_ocr_scheduler::metrics::BATCH_SIZE.into()), &sizes)?
        .install_recorder()?)
}

/// Counts every request by route, status and adapter, and times it end to end.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let adapter = response.extensions().get::<AdapterLabel>().map_or("", |a| a.0.as_str()).to_string();
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS, "route" => route.clone(), "status" => status, "adapter" => adapter).increment(1);
    metrics::histogram!(HTTP_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}
