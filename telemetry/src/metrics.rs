//! One OpenTelemetry `MeterProvider` per process with two readers: the
//! Prometheus text on the admin endpoint (always), and an OTLP/gRPC periodic
//! exporter when the standard variables ask for one
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`;
//! `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, … as the SDK reads them).

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};

use crate::TelemetryError;
use crate::otlp::{self, ExportRuntime, Signal};
use crate::prom::{PromReader, PromStore};

/// Latency buckets in seconds, from 100 µs to 10 s: mesh operations are fast,
/// and the default OTel buckets are in milliseconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Why metrics could not be set up.
pub type MetricsError = TelemetryError;

/// The process's meter provider and the Prometheus page its reader fills.
#[derive(Clone, Debug)]
pub struct Metrics {
    // Declared first so it drops (and flushes) before the export runtime it uses.
    provider: SdkMeterProvider,
    prom: Arc<PromStore>,
    otlp: Option<Arc<ExportRuntime>>,
}

/// How a component's metrics are set up.
#[derive(Debug, Clone)]
pub struct MetricsBuilder {
    service_name: &'static str,
    idle_expiry: Option<Duration>,
}

impl MetricsBuilder {
    /// Drops a counter or histogram series from the Prometheus page once it
    /// has not changed for `idle` (the proxy's per-peer series); `None`, the
    /// default, keeps every series for the life of the process.
    pub fn idle_expiry(mut self, idle: Option<Duration>) -> Self {
        self.idle_expiry = idle;
        self
    }

    /// Builds the provider; must run inside a tokio runtime only in the sense
    /// that it may be called from one (the OTLP exporter has its own).
    pub fn build(self) -> Result<Metrics, TelemetryError> {
        let reader = PromReader::new();
        let prom = Arc::new(PromStore::new(reader.clone(), self.idle_expiry));
        let mut builder = SdkMeterProvider::builder()
            .with_resource(otlp::resource(self.service_name))
            .with_reader(reader);
        let otlp = if otlp::enabled(Signal::Metrics)? {
            let rt = ExportRuntime::start()?;
            let exporter = rt.metric_exporter()?;
            builder = builder.with_reader(PeriodicReader::builder(exporter).build());
            Some(rt)
        } else {
            None
        };
        let provider = builder.build();
        crate::process::register(&provider.meter("sidemesh-process"));
        if otlp.is_some() {
            tracing::info!("exporting metrics over OTLP");
        }
        Ok(Metrics { provider, prom, otlp })
    }
}

impl Metrics {
    /// The provider for a service (`service.name` unless `OTEL_SERVICE_NAME`
    /// or `OTEL_RESOURCE_ATTRIBUTES` names one), every series kept.
    pub fn new(service_name: &'static str) -> Result<Self, TelemetryError> {
        Self::builder(service_name).build()
    }

    /// A builder for other settings.
    pub fn builder(service_name: &'static str) -> MetricsBuilder {
        MetricsBuilder {
            service_name,
            idle_expiry: None,
        }
    }

    /// A meter for one component's instruments.
    pub fn meter(&self, scope: &'static str) -> Meter {
        self.provider.meter(scope)
    }

    /// Whether metrics also leave over OTLP.
    pub fn exports_otlp(&self) -> bool {
        self.otlp.is_some()
    }

    /// The current values as Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.prom.render()
    }

    /// Exports what is left over OTLP and stops the exporter. The SDK blocks
    /// while it exports, so this runs on tokio's blocking pool and can be
    /// awaited from any runtime, the current-thread one included.
    pub async fn shutdown(&self) {
        if self.otlp.is_none() {
            return;
        }
        let provider = self.provider.clone();
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => tracing::debug!("metrics flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing metrics over OTLP"),
            Err(e) => tracing::warn!(error = %e, "flushing metrics over OTLP"),
        }
    }
}
