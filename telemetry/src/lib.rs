//! Process plumbing shared by every sidemesh binary: logging (`SIDEMESH_LOG`,
//! `SIDEMESH_LOG_FORMAT`), the OpenTelemetry meter provider with its Prometheus
//! reader, the plain-HTTP admin endpoint, and the shutdown signal.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod flags;
pub mod logging;
pub mod metrics;
pub mod shutdown;

pub use metrics::Metrics;
