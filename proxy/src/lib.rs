//! The sidemesh sidecar proxy. A connection's path, file by file:
//!
//! - [`capture`]: `sidemesh-proxy init`, the iptables rules that send the
//!   Pod's TCP traffic to the outbound and inbound ports;
//! - [`socket`]: the original destination of a redirected connection;
//! - [`detect`]: HTTP/1, HTTP/2, TLS or opaque, from the first bytes;
//! - [`discovery`]: what the destination is (the destination service's stream);
//! - [`endpoint`]: endpoints with address and identity parsed once;
//! - [`outbound`]: the application's connections out;
//! - [`policy`]: HTTPRoute rules compiled and matched, weighted backend split;
//! - [`balance`]: P2C over peak-EWMA latency, failure accrual and ejection;
//! - [`retry`]: retry budget and backoff;
//! - [`replay`]: request bodies of unknown length copied for a retry;
//! - [`pool`]: mTLS HTTP/2 connections to peer proxies;
//! - [`plain`]: plain HTTP to the application and unmeshed upstreams;
//! - [`relay`]: opaque TCP copied both ways;
//! - [`upgrade`]: HTTP/1.1 upgrades (WebSocket) on connections of their own;
//! - [`tls`]: mesh TLS configurations;
//! - [`inbound`]: connections in, mTLS terminated, delivered to the application;
//! - [`http`]: request rewriting between HTTP/1, HTTP/2 and the mesh hop;
//! - [`identity_metrics`]: certificate and trust-bundle gauges;
//! - [`telemetry`]: request, retry, TCP and TLS metrics, and spans;
//! - [`admin`]: `/ready`, `/live`, `/metrics`, `/debug/state`, `POST /shutdown`;
//! - [`drain`]: graceful shutdown, and the drain-aware loop of every HTTP connection.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod balance;
pub mod capture;
pub mod cli;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod endpoint;
pub mod http;
pub mod identity_metrics;
pub mod inbound;
pub mod outbound;
pub mod plain;
pub mod policy;
pub mod pool;
pub mod relay;
pub mod replay;
pub mod retry;
pub mod run;
pub mod socket;
pub mod telemetry;
pub mod tls;
pub mod upgrade;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use sidemesh_identity_client::{CertManager, TrustStore};

/// Everything a connection handler needs, shared.
#[derive(Debug)]
pub struct Proxy {
    /// Pooled mesh connections (and mesh TLS); `None` without an identity.
    pub pool: Option<pool::MeshPool>,
    /// Plain HTTP clients (unmeshed upstreams and the local application).
    pub plain: plain::PlainClients,
    /// Endpoint statistics for load balancing.
    pub balancer: balance::Balancer,
    /// Discovery cache.
    pub discovery: discovery::Discovery,
    /// Certificate manager, when an identity service is configured.
    pub certs: Option<CertManager>,
    /// Trust bundle in force.
    pub trust: Option<TrustStore>,
    /// Ports never inspected.
    pub opaque_ports: BTreeSet<u16>,
    /// Where inbound traffic goes.
    pub app_ip: IpAddr,
    /// A fixed application port (`SIDEMESH_APP_ADDR=ip:port`), else the original port.
    pub app_port: Option<u16>,
    /// Inbound policy.
    pub inbound_policy: config::InboundPolicy,
    /// First-bytes wait.
    pub detect_timeout: Duration,
    /// Graceful shutdown.
    pub drain: drain::Drain,
    /// Metrics and spans.
    pub telemetry: std::sync::Arc<telemetry::ProxyTelemetry>,
}

pub use run::run;
