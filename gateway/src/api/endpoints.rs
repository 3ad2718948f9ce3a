//! Every endpoint of the REST API, written once. The router dispatches through this table
//! ([`resolve`]) and the OpenAPI document is built from it (`super::openapi`), so the
//! document cannot name a route the router lacks, nor the router serve one the document
//! does not list.

use std::borrow::Cow;

use hyper::Method;

/// What a request asks for, once its method and path are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Healthz,
    OpenApi,
    Metrics,
    Site,
    Plugins,
    Peers,
    PeerLink,
    Routes,
    CloseRoute,
    Workloads,
    RunWorkload,
    Workload,
    RemoveWorkload,
    TakeCheckpoint,
    Checkpoints,
    StartWorkload,
    RecoverWorkload,
    RestoreWorkload,
    Migrations,
    StartMigration,
    PlanMigration,
    AbortMigration,
    Migration,
    MigrationEvents,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    pub fn method(self) -> Method {
        match self {
            Verb::Get => Method::GET,
            Verb::Post => Method::POST,
            Verb::Delete => Method::DELETE,
        }
    }
}

/// The name of a schema in the document's components (a type deriving `ToSchema`).
pub type SchemaName = fn() -> Cow<'static, str>;

/// What a successful answer carries.
#[derive(Clone, Copy)]
pub enum Answer {
    /// One JSON value of this schema.
    One(SchemaName),
    /// A JSON array of values of this schema.
    List(SchemaName),
    /// Text of this content type.
    Text(&'static str),
    /// Server-sent events: `progress` events whose `data:` is the first schema, then one
    /// `end` event whose `data:` is the second.
    Events(SchemaName, SchemaName),
    /// The OpenAPI document itself.
    Document,
}

/// A request body.
#[derive(Clone, Copy)]
pub struct Input {
    pub schema: SchemaName,
    /// An empty body stands for the schema's defaults.
    pub optional: bool,
}

pub struct Endpoint {
    pub op: Op,
    pub verb: Verb,
    /// Path template; `{name}` matches one non-empty segment.
    pub path: &'static str,
    pub summary: &'static str,
    /// Needs `Authorization: Bearer TOKEN`.
    pub auth: bool,
    pub input: Option<Input>,
    /// Status of a successful answer.
    pub status: u16,
    pub answer: Answer,
}

fn name<T: utoipa::ToSchema>() -> Cow<'static, str> {
    T::name()
}

const fn body(schema: SchemaName) -> Option<Input> {
    Some(Input {
        schema,
        optional: false,
    })
}

const fn optional(schema: SchemaName) -> Option<Input> {
    Some(Input {
        schema,
        optional: true,
    })
}

use super::types as t;
use crate::checkpoint::CheckpointInfo as Checkpoint;
use crate::migration::{Migration, MovePlan};
use crate::peer::LinkMeasure;
use crate::plugins::PluginInfo;
use crate::spec::{Workload, WorkloadSpec};

/// Every endpoint, in the order the router tries them (a literal segment before a
/// parameter at the same place: `POST /v1/migrations/plan` before `…/{id}`).
pub static ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        op: Op::Healthz,
        verb: Verb::Get,
        path: "/healthz",
        summary: "Liveness: answers while the gateway serves its API (no token needed)",
        auth: false,
        input: None,
        status: 200,
        answer: Answer::One(name::<t::Health>),
    },
    Endpoint {
        op: Op::OpenApi,
        verb: Verb::Get,
        path: "/v1/openapi.json",
        summary: "This document (no token needed)",
        auth: false,
        input: None,
        status: 200,
        answer: Answer::Document,
    },
    Endpoint {
        op: Op::Metrics,
        verb: Verb::Get,
        path: "/metrics",
        summary: "Prometheus metrics of workloads, migrations and routes",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::Text("text/plain; version=0.0.4"),
    },
    Endpoint {
        op: Op::Site,
        verb: Verb::Get,
        path: "/v1/site",
        summary: "This site: name, version, certificate fingerprint, addresses, peers",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::One(name::<t::SiteInfo>),
    },
    Endpoint {
        op: Op::Plugins,
        verb: Verb::Get,
        path: "/v1/plugins",
        summary: "Adapters loaded here, with what they ask and what they are granted",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::List(name::<PluginInfo>),
    },
    Endpoint {
        op: Op::Peers,
        verb: Verb::Get,
        path: "/v1/peers",
        summary: "Each configured peer, probed now over the peer link",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::List(name::<t::PeerStatus>),
    },
    Endpoint {
        op: Op::PeerLink,
        verb: Verb::Get,
        path: "/v1/peers/{name}/link",
        summary: "Measures the link to a peer: round trip, rate (8 MiB sent), clock skew",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::One(name::<LinkMeasure>),
    },
    Endpoint {
        op: Op::Routes,
        verb: Verb::Get,
        path: "/v1/routes",
        summary: "Ingress routes at this site and where each leads now",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::List(name::<t::RouteInfo>),
    },
    Endpoint {
        op: Op::CloseRoute,
        verb: Verb::Delete,
        path: "/v1/routes/{workload}",
        summary: "Closes the routes still forwarding to a workload that moved away",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::One(name::<t::RouteClosed>),
    },
    Endpoint {
        op: Op::Workloads,
        verb: Verb::Get,
        path: "/v1/workloads",
        summary: "Workloads at this site",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::List(name::<Workload>),
    },
    Endpoint {
        op: Op::RunWorkload,
        verb: Verb::Post,
        path: "/v1/workloads",
        summary: "Starts a workload",
        auth: true,
        input: body(name::<WorkloadSpec>),
        status: 201,
        answer: Answer::One(name::<Workload>),
    },
    Endpoint {
        op: Op::Workload,
        verb: Verb::Get,
        path: "/v1/workloads/{name}",
        summary: "One workload",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::One(name::<Workload>),
    },
    Endpoint {
        op: Op::RemoveWorkload,
        verb: Verb::Delete,
        path: "/v1/workloads/{name}",
        summary: "Stops and removes a workload (refused while a migration holds it)",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::One(name::<Workload>),
    },
    Endpoint {
        op: Op::TakeCheckpoint,
        verb: Verb::Post,
        path: "/v1/workloads/{name}/checkpoints",
        summary: "Checkpoints a workload (it goes to standby unless leave_running)",
        auth: true,
        input: optional(name::<t::CheckpointRequest>),
        status: 201,
        answer: Answer::One(name::<Checkpoint>),
    },
    Endpoint {
        op: Op::Checkpoints,
        verb: Verb::Get,
        path: "/v1/workloads/{name}/checkpoints",
        summary: "A workload's checkpoints kept at this site",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::List(name::<Checkpoint>),
    },
    Endpoint {
        op: Op::StartWorkload,
        verb: Verb::Post,
        path: "/v1/workloads/{name}/start",
        summary: "Starts a workload its restart policy left stopped",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::One(name::<Workload>),
    },
    Endpoint {
        op: Op::RecoverWorkload,
        verb: Verb::Post,
        path: "/v1/workloads/{name}/recover",
        summary: "Restores, here, a peer's workload from its checkpoint replicated here",
        auth: true,
        input: optional(name::<t::RecoverRequest>),
        status: 200,
        answer: Answer::One(name::<Workload>),
    },
    Endpoint {
        op: Op::RestoreWorkload,
        verb: Verb::Post,
        path: "/v1/workloads/{name}/restore",
        summary: "Restores a workload from one of its checkpoints",
        auth: true,
        input: optional(name::<t::RestoreRequest>),
        status: 200,
        answer: Answer::One(name::<Workload>),
    },
    Endpoint {
        op: Op::Migrations,
        verb: Verb::Get,
        path: "/v1/migrations",
        summary: "Migrations this site took part in",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::List(name::<Migration>),
    },
    Endpoint {
        op: Op::StartMigration,
        verb: Verb::Post,
        path: "/v1/migrations",
        summary: "Starts moving a workload to a peer (409 if the peer cannot restore it; \
                  nothing is frozen then)",
        auth: true,
        input: body(name::<t::MigrationRequest>),
        status: 202,
        answer: Answer::One(name::<Migration>),
    },
    Endpoint {
        op: Op::PlanMigration,
        verb: Verb::Post,
        path: "/v1/migrations/plan",
        summary: "What a migration would do, and why, without starting it",
        auth: true,
        input: body(name::<t::MigrationRequest>),
        status: 200,
        answer: Answer::One(name::<MovePlan>),
    },
    Endpoint {
        op: Op::AbortMigration,
        verb: Verb::Delete,
        path: "/v1/migrations/{id}",
        summary: "Asks to abort a migration (refused once the destination runs the workload)",
        auth: true,
        input: None,
        status: 202,
        answer: Answer::One(name::<Migration>),
    },
    Endpoint {
        op: Op::Migration,
        verb: Verb::Get,
        path: "/v1/migrations/{id}",
        summary: "One migration's record",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::One(name::<Migration>),
    },
    Endpoint {
        op: Op::MigrationEvents,
        verb: Verb::Get,
        path: "/v1/migrations/{id}/events",
        summary: "A migration's progress as server-sent events: `progress` events, then one \
                  `end` event with the final record (or `error` if it is no longer recorded)",
        auth: true,
        input: None,
        status: 200,
        answer: Answer::Events(name::<t::MigrationEvent>, name::<Migration>),
    },
];

/// What the table says of a request.
pub enum Resolved<'p> {
    /// The endpoint, and the path's parameters in the template's order.
    Found(&'static Endpoint, Vec<&'p str>),
    /// The path exists, not with this method.
    WrongMethod,
    NotFound,
}

/// The endpoint a method and path ask for.
pub fn resolve<'p>(method: &Method, path: &'p str) -> Resolved<'p> {
    let path = path.trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut path_known = false;
    for e in ENDPOINTS {
        let Some(params) = matches(e.path, &segments) else {
            continue;
        };
        if e.verb.method() == method {
            return Resolved::Found(e, params);
        }
        path_known = true;
    }
    if path_known {
        Resolved::WrongMethod
    } else {
        Resolved::NotFound
    }
}

/// The parameters of `template` in `segments`, if they match it.
fn matches<'p>(template: &str, segments: &[&'p str]) -> Option<Vec<&'p str>> {
    let parts: Vec<&str> = template.split('/').skip(1).collect();
    if parts.len() != segments.len() {
        return None;
    }
    let mut params = Vec::new();
    for (part, seg) in parts.iter().zip(segments) {
        if part.starts_with('{') {
            if seg.is_empty() {
                return None;
            }
            params.push(*seg);
        } else if part != seg {
            return None;
        }
    }
    Some(params)
}

/// The names of a template's parameters (`{id}` → `id`).
pub fn parameters(template: &str) -> impl Iterator<Item = &str> {
    template
        .split('/')
        .filter_map(|p| p.strip_prefix('{').and_then(|p| p.strip_suffix('}')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(method: Method, path: &str) -> Option<(Op, Vec<String>)> {
        match resolve(&method, path) {
            Resolved::Found(e, p) => Some((e.op, p.iter().map(|s| (*s).to_string()).collect())),
            _ => None,
        }
    }

    #[test]
    fn literal_segments_win_over_parameters_and_methods_choose_among_one_path() {
        assert_eq!(
            op(Method::POST, "/v1/migrations/plan"),
            Some((Op::PlanMigration, vec![]))
        );
        assert_eq!(
            op(Method::GET, "/v1/migrations/plan"),
            Some((Op::Migration, vec!["plan".into()]))
        );
        assert_eq!(
            op(Method::POST, "/v1/workloads/redis/checkpoints/"),
            Some((Op::TakeCheckpoint, vec!["redis".into()]))
        );
        assert_eq!(
            op(Method::GET, "/v1/migrations/abc/events"),
            Some((Op::MigrationEvents, vec!["abc".into()]))
        );
        assert!(matches!(
            resolve(&Method::DELETE, "/v1/migrations"),
            Resolved::WrongMethod
        ));
        assert!(matches!(
            resolve(&Method::GET, "/v1/workloads//checkpoints"),
            Resolved::NotFound
        ));
        assert!(matches!(
            resolve(&Method::GET, "/v1/nothing"),
            Resolved::NotFound
        ));
    }

    #[test]
    fn no_two_endpoints_share_a_method_and_template() {
        for (i, a) in ENDPOINTS.iter().enumerate() {
            for b in &ENDPOINTS[i + 1..] {
                assert!(
                    !(a.verb == b.verb && a.path == b.path),
                    "{:?} {} twice",
                    a.verb,
                    a.path
                );
                assert_ne!(a.op, b.op, "{:?} twice", a.op);
            }
        }
    }
}
