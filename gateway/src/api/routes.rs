//! Request routing, authentication and the handlers of the REST API.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::endpoints::{resolve, Op, Resolved};
use super::error::ApiError;
use super::types::{
    CheckpointRequest, Health, MigrationRequest, PeerStatus, RecoverRequest, RestoreRequest,
    RouteClosed, RouteInfo,
};
use super::ApiState;
use crate::checkpoint::CheckpointInfo;
use crate::peer::wire;
use crate::proxy::ProxyError;
use crate::spec::WorkloadSpec;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// How much of an oversize body is read and dropped before answering 413.
const MAX_DRAIN: usize = 1024 * 1024;

type Reply = Result<Response<Full<Bytes>>, ApiError>;

/// Bytes a link check (`GET /v1/peers/{name}/link`) sends.
const LINK_CHECK_BYTES: u64 = 8 << 20;

#[derive(Clone)]
pub struct Api {
    state: Arc<ApiState>,
}

impl Api {
    pub fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        // Every body is read (bounded) before the answer, whatever the route: a client
        // still sending gets its 4xx, not a reset connection.
        let (parts, body) = req.into_parts();
        let result = match read_body(body).await {
            Ok(body) => self.route(&parts, body).await,
            Err(e) => Err(e),
        };
        let response = result.unwrap_or_else(|e| json(e.status, &e.body()));
        tracing::debug!(%method, %path, status = response.status().as_u16(), us = started.elapsed().as_micros() as u64, "api request");
        response
    }

    /// `GET /v1/migrations/{id}/events`, if `req` asks for it: the event stream, or the
    /// error (401, 404) as a whole answer.
    pub fn events(
        &self,
        req: &Request<Incoming>,
    ) -> Option<Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>>
    {
        use http_body_util::BodyExt;
        let Resolved::Found(endpoint, params) = resolve(req.method(), req.uri().path()) else {
            return None;
        };
        if endpoint.op != Op::MigrationEvents {
            return None;
        }
        let id = params.first().copied().unwrap_or_default();
        if !self.authorized(req.headers()) {
            let e = unauthorized();
            return Some(json(e.status, &e.body()).map(BodyExt::boxed));
        }
        if self.state.engine.get(id).is_none() {
            let e = ApiError::not_found(format!("no migration {id}"));
            return Some(json(e.status, &e.body()).map(BodyExt::boxed));
        }
        let body = super::events::follow(Arc::clone(&self.state.engine), (*id).to_string());
        let mut r = Response::new(body.boxed());
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut().insert(
            hyper::header::CACHE_CONTROL,
            hyper::header::HeaderValue::from_static("no-cache"),
        );
        Some(r)
    }

    fn authorized(&self, headers: &hyper::HeaderMap) -> bool {
        let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some(token) = value.strip_prefix("Bearer ") else {
            return false;
        };
        constant_time_eq(token.as_bytes(), self.state.token.as_bytes())
    }

    async fn route(&self, req: &hyper::http::request::Parts, body: Body) -> Reply {
        let path = req.uri.path();
        let resolved = resolve(&req.method, path);
        // Only the public endpoints answer without the token (an unknown path too gets
        // 401 first).
        let public = matches!(resolved, Resolved::Found(e, _) if !e.auth);
        if !public && !self.authorized(&req.headers) {
            return Err(unauthorized());
        }
        let (endpoint, params) = match resolved {
            Resolved::Found(e, params) => (e, params),
            Resolved::WrongMethod => {
                return Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{} is not allowed on {path}", req.method),
                ))
            }
            Resolved::NotFound => {
                return Err(ApiError::not_found(format!("no such endpoint: {path}")))
            }
        };
        // The table's templates give each endpoint its parameters, in order.
        // Every template has at most one: a workload's or peer's name, or a migration's id.
        let param = params.first().copied().unwrap_or_default();
        let (name, workload, id) = (param, param, param);
        match endpoint.op {
            Op::Healthz => Ok(json(
                StatusCode::OK,
                &Health {
                    status: "ok".into(),
                },
            )),
            Op::OpenApi => Ok(json(StatusCode::OK, &super::openapi::document())),
            Op::Metrics => {
                let text = crate::metrics::render(
                    &self.state.workloads.list(),
                    &self.state.engine.list(),
                    &self.state.ingress.stats(),
                );
                let mut r = Response::new(Full::new(Bytes::from(text)));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                Ok(r)
            }
            Op::Site => Ok(json(StatusCode::OK, &self.state.site)),
            Op::Plugins => Ok(json(StatusCode::OK, &self.state.plugins.list())),
            Op::Peers => Ok(json(StatusCode::OK, &self.peer_status().await)),
            Op::PeerLink => {
                if !self.state.peers.peers().iter().any(|p| p.name == *name) {
                    return Err(ApiError::not_found(format!(
                        "no peer {name:?}; `ferry peer ls` lists them"
                    )));
                }
                let measured = tokio::time::timeout(
                    Duration::from_secs(30),
                    self.state.peers.measure(name, LINK_CHECK_BYTES),
                )
                .await
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "peer_unreachable",
                        format!("the link check to {name} did not finish within 30 s"),
                    )
                })?
                .map_err(|e| {
                    ApiError::new(StatusCode::BAD_GATEWAY, "peer_unreachable", e.to_string())
                })?;
                Ok(json(StatusCode::OK, &measured))
            }
            Op::Routes => {
                let routes: Vec<RouteInfo> = self
                    .state
                    .ingress
                    .stats()
                    .into_iter()
                    .map(RouteInfo::from)
                    .collect();
                Ok(json(StatusCode::OK, &routes))
            }
            Op::CloseRoute => match self.state.ingress.close_forwarded(workload) {
                Ok(()) => Ok(json(
                    StatusCode::OK,
                    &RouteClosed {
                        workload: workload.to_string(),
                        closed: true,
                    },
                )),
                Err(e @ ProxyError::NoRoutes(_)) => Err(ApiError::not_found(e.to_string())),
                Err(e) => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    e.to_string(),
                )),
            },
            Op::Workloads => Ok(json(StatusCode::OK, &self.state.workloads.list())),
            Op::RunWorkload => {
                let spec: WorkloadSpec = body.json()?;
                allowed(&spec, self.state.allowed_commands.as_deref())?;
                let w = self.state.workloads.run(spec).await?;
                let mut r = json(StatusCode::CREATED, &w);
                set_location(&mut r, &format!("/v1/workloads/{}", w.spec.name));
                Ok(r)
            }
            Op::Workload => self
                .state
                .workloads
                .get(name)
                .map(|w| json(StatusCode::OK, &w))
                .ok_or_else(|| {
                    ApiError::not_found(format!("workload {name:?} not found on this site"))
                }),
            Op::RemoveWorkload => {
                self.state.engine.check_removable(name).await?;
                let w = self.state.workloads.remove(name).await?;
                Ok(json(StatusCode::OK, &w))
            }
            Op::TakeCheckpoint => {
                let body: CheckpointRequest = body.json_or_default()?;
                let c = self
                    .state
                    .checkpoints
                    .take(name, body.leave_running)
                    .await?;
                let mut r = json(StatusCode::CREATED, &CheckpointInfo::from(&c));
                set_location(
                    &mut r,
                    &format!("/v1/workloads/{name}/checkpoints/{}", c.id),
                );
                Ok(r)
            }
            Op::Checkpoints => {
                let list: Vec<CheckpointInfo> = self
                    .state
                    .checkpoints
                    .list(name)?
                    .iter()
                    .map(CheckpointInfo::from)
                    .collect();
                Ok(json(StatusCode::OK, &list))
            }
            Op::StartWorkload => {
                let w = self.state.restarts.start_stopped(name).await?;
                Ok(json(StatusCode::OK, &w))
            }
            Op::RecoverWorkload => {
                let body: RecoverRequest = body.json_or_default()?;
                let w = self
                    .state
                    .checkpoints
                    .recover(name, body.from.as_deref(), body.force)
                    .await?;
                Ok(json(StatusCode::OK, &w))
            }
            Op::RestoreWorkload => {
                let body: RestoreRequest = body.json_or_default()?;
                let w = self
                    .state
                    .checkpoints
                    .restore(name, body.from.as_deref(), body.replace)
                    .await?;
                Ok(json(StatusCode::OK, &w))
            }
            Op::Migrations => Ok(json(StatusCode::OK, &self.state.engine.list())),
            Op::StartMigration => {
                let body: MigrationRequest = body.json()?;
                // A destination that cannot restore the workload is refused here (409),
                // before anything is held or frozen.
                let plan = self
                    .state
                    .engine
                    .refuse_incompatible(&body.workload, &body.to, &body.options())
                    .await?;
                let m = self.state.engine.start_planned(
                    &body.workload,
                    &body.to,
                    body.options(),
                    Some(plan),
                )?;
                let mut r = json(StatusCode::ACCEPTED, &m);
                set_location(&mut r, &format!("/v1/migrations/{}", m.id));
                Ok(r)
            }
            Op::PlanMigration => {
                let body: MigrationRequest = body.json()?;
                let plan = self
                    .state
                    .engine
                    .plan_only(&body.workload, &body.to, &body.options())
                    .await?;
                Ok(json(StatusCode::OK, &plan))
            }
            Op::AbortMigration => {
                let m = self.state.engine.operator_abort(id)?;
                Ok(json(StatusCode::ACCEPTED, &m))
            }
            Op::Migration => self
                .state
                .engine
                .get(id)
                .map(|m| json(StatusCode::OK, &m))
                .ok_or_else(|| {
                    ApiError::not_found(format!("migration {id:?} not found on this site"))
                }),
            // Streamed by `events`, before a whole answer is read.
            Op::MigrationEvents => Err(ApiError::bad_request(
                "the event stream is served on its own connection path; retry the request",
            )),
        }
    }

    async fn peer_status(&self) -> Vec<PeerStatus> {
        let mut out = Vec::new();
        for p in self.state.peers.peers() {
            let started = Instant::now();
            let probe = tokio::time::timeout(
                Duration::from_secs(5),
                self.state.peers.request(&p.name, &wire::Request::Hello),
            )
            .await;
            let rtt = started.elapsed().as_secs_f64() * 1000.0;
            let mut s = PeerStatus {
                name: p.name.clone(),
                address: p.address,
                reachable: false,
                version: None,
                rtt_ms: None,
                error: None,
            };
            match probe {
                Ok(Ok(wire::Response::Hello { site, version })) if site == p.name => {
                    s.reachable = true;
                    s.version = Some(version);
                    s.rtt_ms = Some(rtt);
                }
                Ok(Ok(wire::Response::Hello { site, .. })) => {
                    s.error = Some(format!("answered as site {site:?}"));
                }
                Ok(Ok(other)) => s.error = Some(format!("unexpected answer {other:?}")),
                Ok(Err(e)) => s.error = Some(e.to_string()),
                Err(_) => s.error = Some("no answer within 5 s".into()),
            }
            out.push(s);
        }
        out
    }
}

/// A request's body, read before routing: its first [`MAX_BODY`] bytes, and whether it
/// was longer.
struct Body {
    bytes: Vec<u8>,
    too_large: bool,
}

impl Body {
    /// As [`Self::json`], an empty body being `T`'s default.
    fn json_or_default<T: DeserializeOwned + Default>(&self) -> Result<T, ApiError> {
        if self.bytes.is_empty() && !self.too_large {
            return Ok(T::default());
        }
        self.json()
    }

    /// The body as JSON: 413 if it was too large, 422 if it is not a valid `T`.
    fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.too_large {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds {MAX_BODY} bytes"),
            ));
        }
        serde_json::from_slice(&self.bytes).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_json",
                format!("request body is not valid: {e}"),
            )
        })
    }
}

/// Reads a body: up to [`MAX_BODY`] bytes kept, the rest (up to [`MAX_DRAIN`]) read and
/// dropped so the client, still sending, actually receives the answer.
async fn read_body(mut body: Incoming) -> Result<Body, ApiError> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen <= MAX_BODY {
            bytes.extend_from_slice(&data);
        } else if seen > MAX_DRAIN {
            break;
        }
    }
    Ok(Body {
        bytes,
        too_large: seen > MAX_BODY,
    })
}

/// Compares without an early exit, so response timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong bearer token; pass the api.token from site.toml as 'Authorization: Bearer TOKEN'",
    )
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|e| {
        format!("{{\"code\":\"internal\",\"message\":\"cannot encode the response: {e}\"}}")
            .into_bytes()
    });
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn set_location(r: &mut Response<Full<Bytes>>, location: &str) {
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(LOCATION, v);
    }
}

/// Refuses a workload whose program `[api] allowed_commands` does not list.
fn allowed(spec: &WorkloadSpec, list: Option<&[String]>) -> Result<(), ApiError> {
    crate::workload::program_allowed(spec, list).map_err(|why| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "command_not_allowed",
            format!("{why}: add it to [api] allowed_commands in site.toml"),
        )
    })
}
