//! `GET /openapi.json`: the OpenAPI 3.1 document of this API, generated from the types in
//! `crate::api` and the handlers' `#[utoipa::path]` annotations, with the limits of the
//! running configuration filled in.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{Object, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, OpenApi as Document, RefOr, Required, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::{adapters, chat, extract, models, ops, REQUEST_ID_HEADER};
use qwen_ocr_model::preprocess::image::MAX_RESIZED_PIXELS;

use crate::api::error::ErrorResponse;
use crate::config::ServerConfig;
use crate::state::AppState;

/// The scheme name the `/v1` operations require.
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "qwen-ocr",
        description = "OpenAI-compatible OCR and structured extraction with Qwen2-VL and LoRA adapters. \
            Errors are OpenAI-shaped (`ErrorResponse`); their `code` says which failure it was.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        extract::extract,
        chat::completions,
        models::list,
        adapters::list,
        adapters::load,
        adapters::unload,
        ops::health,
        ops::ready,
        ops::metrics,
        openapi,
    ),
    modifiers(&EveryOperation),
    tags(
        (name = "generation", description = "Reading images"),
        (name = "adapters", description = "LoRA adapters and their extraction profiles"),
        (name = "operations", description = "Probes, metrics and this document; never authenticated"),
    ),
)]
struct ApiDoc;

/// This document, for the running configuration.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json", body = serde_json::Value)),
)]
pub async fn openapi(State(state): State<Arc<AppState>>) -> Json<Document> {
    Json(document(&state.config))
}

/// The document with the configuration's limits as the bounds of the fields they bound.
pub fn document(config: &ServerConfig) -> Document {
    let mut doc = ApiDoc::openapi();
    let max_tokens = config.max_tokens_limit;
    let top_logprobs = qwen_ocr_model::decoding::logprobs::MAX_TOP_LOGPROBS;
    // The most any family takes; each checkpoint refuses what is over its own cap.
    let pixels = MAX_RESIZED_PIXELS as usize;
    if let Some(components) = doc.components.as_mut() {
        for (schema, property, maximum) in [
            ("ChatCompletionRequest", "max_tokens", max_tokens),
            ("ChatCompletionRequest", "max_completion_tokens", max_tokens),
            ("ChatCompletionRequest", "top_logprobs", top_logprobs),
            ("ExtractForm", "max_tokens", max_tokens),
            ("LoadAdapterRequest", "max_tokens", max_tokens),
            ("LoadAdapterRequest", "min_pixels", pixels),
            ("LoadAdapterRequest", "max_pixels", pixels),
            ("ExtractForm", "min_pixels", pixels),
            ("ExtractForm", "max_pixels", pixels),
            ("MmProcessorKwargs", "min_pixels", pixels),
            ("MmProcessorKwargs", "max_pixels", pixels),
            ("ImageUrl", "min_pixels", pixels),
            ("ImageUrl", "max_pixels", pixels),
        ] {
            let found = components.schemas.get_mut(schema).and_then(|s| property_mut(s, property));
            set_maximum(found.unwrap_or_else(|| panic!("{schema}.{property} is documented")), maximum);
        }
    }
    link_adapter_operations(&mut doc);
    let extract = doc.paths.paths.get_mut("/v1/extract").and_then(|p| p.post.as_mut()).expect("the extract route is documented");
    for (name, maximum) in [("max_tokens", max_tokens), ("min_pixels", pixels), ("max_pixels", pixels)] {
        let query = extract.parameters.iter_mut().flatten().find(|p| p.name == name && p.parameter_in == ParameterIn::Query);
        set_maximum(query.and_then(|p| p.schema.as_mut()).unwrap_or_else(|| panic!("the extract query has {name}")), maximum);
    }
    doc
}

/// An adapter that `POST /v1/adapters` loaded is listed by `GET /v1/adapters` and unloaded by
/// `DELETE /v1/adapters/{name}` with the name the answer gives: links, so that clients and
/// stateful testers can follow the chain.
fn link_adapter_operations(doc: &mut Document) {
    // utoipa 5.5 writes a link's `operationId` as `operation_id`, which no OpenAPI tool reads:
    // it goes in through the extensions map, which is written as given.
    let link = |operation: &str, description: &str| {
        let mut named = Extensions::default();
        named.insert("operationId".into(), operation.into());
        LinkBuilder::new().description(description).extensions(Some(named))
    };
    let load = doc.paths.paths.get_mut("/v1/adapters").and_then(|p| p.post.as_mut()).expect("the load route is documented");
    for status in ["200", "201"] {
        if let Some(RefOr::T(response)) = load.responses.responses.get_mut(status) {
            let unload = link("unload_adapter", "Unload the adapter just loaded").parameter("name", "$response.body#/name").build();
            response.links.insert("unload".into(), RefOr::T(unload));
            response.links.insert("list".into(), RefOr::T(link("list_adapters", "List it with the others").build()));
        }
    }
}

/// The schema of `name` in an object schema, or in one of the parts of an `allOf` or `oneOf`.
fn property_mut<'a>(schema: &'a mut RefOr<Schema>, name: &str) -> Option<&'a mut RefOr<Schema>> {
    match schema {
        RefOr::T(Schema::Object(object)) => object.properties.get_mut(name),
        RefOr::T(Schema::AllOf(all)) => all.items.iter_mut().find_map(|part| property_mut(part, name)),
        RefOr::T(Schema::OneOf(one)) => one.items.iter_mut().find_map(|part| property_mut(part, name)),
        _ => None,
    }
}

fn set_maximum(schema: &mut RefOr<Schema>, maximum: usize) {
    if let RefOr::T(Schema::Object(object)) = schema {
        object.maximum = Some(maximum.into());
    }
}

/// What every operation shares, said once here rather than on each route: the failures any
/// request can meet before its handler runs (a body over `max_body_bytes`, a body not received
/// within `read_timeout_secs`, a bug caught on its way out, a connection over
/// `max_connections`), request ids, and, under `/v1`, the bearer key.
struct EveryOperation;

impl Modify for EveryOperation {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(BEARER, SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
        let (name, schema) = (ErrorResponse::name(), ErrorResponse::schema());
        components.schemas.entry(name.to_string()).or_insert(schema);
        for (path, item) in doc.paths.paths.iter_mut() {
            let operations = [&mut item.get, &mut item.post, &mut item.put, &mut item.delete, &mut item.patch];
            for operation in operations.into_iter().flatten() {
                if path.starts_with("/v1/") {
                    operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
                    add_error(
                        operation,
                        401,
                        "No API key, or a wrong one (`missing_api_key`, `invalid_api_key`), when keys are configured",
                    );
                }
                add_error(operation, 408, "The body was not received within `read_timeout_secs` of the headers (`read_timeout`)");
                add_error(operation, 413, "The body is over `max_body_bytes` (`body_too_large`)");
                add_error(operation, 500, "A bug (`internal_error`)");
                add_error(
                    operation,
                    503,
                    "The server already has `max_connections` connections open (`too_many_connections`); sent before the request is read",
                );
                add_request_id(operation);
            }
        }
    }
}

/// Documents an error status unless the route already says more about it.
fn add_error(operation: &mut Operation, status: u16, description: &str) {
    let content = Content::new(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(ErrorResponse::name()))));
    let response = ResponseBuilder::new().description(description).content("application/json", content).build();
    operation.responses.responses.entry(status.to_string()).or_insert(RefOr::T(response));
}

/// The `X-Request-Id` header: the client's own, or a fresh one, echoed in every response.
fn add_request_id(operation: &mut Operation) {
    let string = || Schema::Object(Object::with_type(Type::String));
    let parameter = ParameterBuilder::new()
        .name(REQUEST_ID_HEADER.as_str())
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some("An id for this request's log lines; a fresh one when absent"))
        .schema(Some(string()))
        .build();
    operation.parameters.get_or_insert_with(Vec::new).push(parameter);
    let header = HeaderBuilder::new().schema(string()).description(Some("The request's id")).build();
    for response in operation.responses.responses.values_mut() {
        if let RefOr::T(response) = response {
            response.headers.insert(REQUEST_ID_HEADER.to_string(), header.clone());
        }
    }
}
