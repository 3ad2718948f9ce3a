//! Ferry: live migration of containerized services between sites.
//!
//! One gateway runs per site. It serves the REST API ([`api`]), keeps mutually
//! authenticated QUIC links to its peer sites ([`peer`]), runs workloads ([`workload`]),
//! drives CRIU ([`criu`]) and moves workloads between sites ([`migration`]), recording each
//! step durably first ([`journal`]).

pub mod api;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod criu;
pub mod gateway;
pub mod health;
pub mod hooks;
pub mod identity;
pub mod journal;
pub mod metrics;
pub mod migration;
pub mod names;
pub mod peer;
pub mod plugins;
pub mod proxy;
pub mod restart;
pub mod spec;
pub mod sys;
pub mod transfer;
pub mod workload;

/// Version string reported by `GET /v1/site` and the peer handshake.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
