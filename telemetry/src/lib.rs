//! Process plumbing shared by every sidemesh binary: logging (`SIDEMESH_LOG`,
//! `SIDEMESH_LOG_FORMAT`), the OpenTelemetry meter provider with its
//! Prometheus page and optional OTLP export, the tracer provider of the
//! proxies, process resource gauges, the plain-HTTP admin endpoint, the
//! shutdown signal, and the runtime and exit code of every service.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod flags;
pub mod logging;
pub mod metrics;
mod otlp;
pub mod process;
mod prom;
pub mod runtime;
pub mod shutdown;
pub mod traces;

pub use metrics::Metrics;
pub use traces::Traces;

/// Why telemetry could not be set up: a bad `OTEL_*` value, an unreadable
/// certificate file, or a thread that would not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The configuration is wrong; the message names the variable.
    #[error("{0}")]
    Config(String),
}
