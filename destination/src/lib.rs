//! The sidemesh destination service: it indexes Services, EndpointSlices,
//! Pods and Gateway API HTTPRoutes (from the Kubernetes API or a YAML file)
//! and streams to each proxy, over mutual TLS, the full state of every
//! original destination (`ip:port`) the proxy subscribes to — endpoints,
//! identities and routes — again on every change.
//!
//! - [`objects`]: the Kubernetes objects read and the small records kept of them;
//! - [`route`]: HTTPRoute, its validation and its status;
//! - [`index`]: records and reverse maps; resolving `ip:port`;
//! - [`indexer`]: the running index, batching source changes and publishing
//!   per-address states;
//! - [`source`]: the `kubernetes` and `file:<path>` sources;
//! - [`service`]: the `Discover` gRPC stream;
//! - [`server`]: mTLS and the gRPC server;
//! - [`metrics`](crate::metrics): instruments.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod index;
pub mod indexer;
pub mod metrics;
pub mod objects;
pub mod route;
pub mod server;
pub mod service;
pub mod source;

/// The SPIFFE ID the destination service has when none is configured: what
/// proxies expect by default (`SIDEMESH_DESTINATION_SERVER_ID`).
pub fn default_server_id(
    trust_domain: &str,
) -> Result<sidemesh_identity_client::SpiffeId, sidemesh_identity_client::spiffe::SpiffeIdError> {
    sidemesh_identity_client::SpiffeId::new(trust_domain, "sidemesh-system", "sidemesh-destination")
}
