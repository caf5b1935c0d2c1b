//! One OpenTelemetry `MeterProvider` per process, read out as Prometheus text
//! on the admin endpoint.

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder as _, TextEncoder};

/// Latency buckets in seconds, from 100 µs to 10 s: mesh operations are fast,
/// and the default OTel buckets are in milliseconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("setting up the Prometheus metrics reader: {0}")]
pub struct MetricsError(String);

/// The process's meter provider and the registry its Prometheus reader fills.
#[derive(Clone, Debug)]
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
}

impl Metrics {
    /// Builds the provider for a service (`service.name` resource attribute).
    pub fn new(service_name: &'static str) -> Result<Self, MetricsError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| MetricsError(e.to_string()))?;
        let resource = Resource::builder().with_service_name(service_name).build();
        let provider = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(exporter)
            .build();
        Ok(Self { provider, registry })
    }

    /// A meter for one component's instruments.
    pub fn meter(&self, scope: &'static str) -> Meter {
        self.provider.meter(scope)
    }

    /// The current values as Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(4096);
        // Encoding into a Vec only fails on invalid metric families, which the
        // exporter never produces; an empty page is the honest fallback.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
