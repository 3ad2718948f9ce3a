//! The OpenAPI 3.1 document of the REST API (`GET /v1/openapi.json`): schemas generated
//! from the Rust types the handlers serialize (utoipa's `ToSchema`), operations from the
//! endpoint table the router dispatches through ([`super::endpoints::ENDPOINTS`]).

use std::collections::BTreeMap;

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{Array, Object, ObjectBuilder, Ref, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, OpenApi, RefOr, Required, ResponseBuilder};
use utoipa::OpenApi as _;

use super::endpoints::{parameters, Answer, Endpoint, Verb, ENDPOINTS};
use super::types as t;

/// The schemas of every body the API reads or writes (nested ones come along).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Ferry gateway API",
        description = "One gateway per site: workloads, checkpoints and live migrations \
                       between sites. Every endpoint but /healthz and /v1/openapi.json \
                       needs `Authorization: Bearer TOKEN` (api.token in site.toml)."
    ),
    components(schemas(
        t::ErrorBody,
        t::Health,
        t::SiteInfo,
        t::PeerStatus,
        t::RouteInfo,
        t::RouteClosed,
        t::CheckpointRequest,
        t::RestoreRequest,
        t::RecoverRequest,
        t::MigrationRequest,
        t::MigrationEvent,
        crate::plugins::PluginInfo,
        crate::peer::LinkMeasure,
        crate::spec::Workload,
        crate::spec::WorkloadSpec,
        crate::checkpoint::CheckpointInfo,
        crate::migration::Migration,
        crate::migration::MovePlan,
    ))
)]
struct Schemas;

/// Name of the bearer-token security scheme.
const BEARER: &str = "bearer";

/// The whole document.
pub fn document() -> OpenApi {
    let mut doc = Schemas::openapi();
    env!("CARGO_PKG_VERSION").clone_into(&mut doc.info.version);
    if let Some(components) = doc.components.as_mut() {
        open_flattened(&mut components.schemas);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
    for e in ENDPOINTS {
        doc.paths
            .add_path_operation(e.path, vec![http_method(e.verb)], operation(e));
    }
    doc
}

/// A record that flattens a request type (a `Workload` holds its `WorkloadSpec`'s fields)
/// is an `allOf` of that type and its own fields. The request type refuses unknown
/// fields (`additionalProperties: false`), which would refuse the record's own: inside
/// an `allOf`, such a type is inlined with its properties left open.
fn open_flattened(schemas: &mut BTreeMap<String, RefOr<Schema>>) {
    let closed: BTreeMap<String, Object> = schemas
        .iter()
        .filter_map(|(name, s)| match s {
            RefOr::T(Schema::Object(o)) if o.additional_properties.is_some() => {
                let mut open = o.clone();
                open.additional_properties = None;
                Some((format!("#/components/schemas/{name}"), open))
            }
            _ => None,
        })
        .collect();
    for schema in schemas.values_mut() {
        let RefOr::T(Schema::AllOf(all)) = schema else {
            continue;
        };
        for item in &mut all.items {
            if let RefOr::Ref(r) = item {
                if let Some(open) = closed.get(&r.ref_location) {
                    *item = RefOr::T(Schema::Object(open.clone()));
                }
            }
        }
    }
}

fn http_method(v: Verb) -> HttpMethod {
    match v {
        Verb::Get => HttpMethod::Get,
        Verb::Post => HttpMethod::Post,
        Verb::Delete => HttpMethod::Delete,
    }
}

fn reference(name: &str) -> Ref {
    Ref::from_schema_name(name)
}

fn operation(e: &Endpoint) -> utoipa::openapi::path::Operation {
    let mut op = OperationBuilder::new()
        .summary(Some(e.summary))
        .operation_id(Some(format!("{:?}", e.op)));
    for p in parameters(e.path) {
        op = op.parameter(
            ParameterBuilder::new()
                .name(p)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(Object::with_type(Type::String))),
        );
    }
    if let Some(input) = e.input {
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(if input.optional {
                    Required::False
                } else {
                    Required::True
                }))
                .content(
                    "application/json",
                    Content::new(Some(reference(&(input.schema)()))),
                )
                .build(),
        ));
    }
    let (content_type, content) = match e.answer {
        Answer::One(name) => ("application/json", Content::new(Some(reference(&name())))),
        Answer::List(name) => (
            "application/json",
            Content::new(Some(Schema::Array(Array::new(reference(&name()))))),
        ),
        Answer::Text(kind) => (kind, Content::new(Some(Object::with_type(Type::String)))),
        Answer::Events(progress, end) => (
            "text/event-stream",
            Content::new(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some(format!(
                        "`event: progress` whose `data:` is a {} as JSON, then one \
                         `event: end` whose `data:` is the final {} once the migration \
                         has ended (`event: error`, data an ErrorBody, if it is no longer \
                         recorded here)",
                        progress(),
                        end()
                    )))
                    .build(),
            )),
        ),
        Answer::Document => (
            "application/json",
            Content::new(Some(Object::with_type(Type::Object))),
        ),
    };
    let ok = ResponseBuilder::new()
        .description("OK")
        .content(content_type, content);
    op = op.response(e.status.to_string(), ok.build()).response(
        "default",
        ResponseBuilder::new()
            .description("An error: a stable `code` and a `message` saying what to do")
            .content(
                "application/json",
                Content::new(Some(reference(&<t::ErrorBody as utoipa::ToSchema>::name()))),
            )
            .build(),
    );
    if e.auth {
        op = op.security(SecurityRequirement::new(BEARER, Vec::<String>::new()));
    }
    op.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_is_documented_once_with_its_method_and_every_schema_it_names_exists() {
        let doc = serde_json::to_value(document()).expect("the document serializes");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        let mut operations = 0;
        for (path, item) in paths {
            for method in item.as_object().expect("a path item").keys() {
                operations += 1;
                assert!(
                    ENDPOINTS.iter().any(
                        |e| e.path == path && format!("{:?}", e.verb).to_lowercase() == *method
                    ),
                    "{method} {path} is documented but not in the table"
                );
            }
        }
        assert_eq!(operations, ENDPOINTS.len());
        // Every $ref resolves to a component.
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        let text = doc.to_string();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap_or_default();
            assert!(
                schemas.contains_key(name),
                "{name} is referenced, not defined"
            );
        }
    }
}
