//! The sidemesh injector: a mutating admission webhook that adds the proxy
//! and its iptables init step to Pods that ask for the mesh.
//!
//! - [`certs`]: the webhook's serving certificate and the CA in its `caBundle`;
//! - [`annotations`]: the annotations that steer injection, and validation
//!   of every override value;
//! - [`inject`]: the decision and the JSON Patch, shared by the webhook and
//!   offline injection;
//! - [`review`]: AdmissionReview parsing and the answer's wire format;
//! - [`namespaces`]: the reflector cache of Namespace annotations;
//! - [`server`]: the HTTPS endpoint with reloadable certificates;
//! - [`offline`]: multi-document YAML injection for `sidemesh inject`;
//! - [`metrics`]: the webhook's instruments.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod annotations;
pub mod certs;
pub mod inject;
pub mod metrics;
pub mod namespaces;
pub mod offline;
pub mod review;
pub mod server;

pub use inject::{InjectorConfig, Plan, plan};
