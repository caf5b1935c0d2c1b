//! The identity service's instruments.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use sidemesh_telemetry::metrics::LATENCY_BUCKETS;

/// Instruments of the certificate authority.
#[derive(Clone, Debug)]
pub struct IdentityMetrics {
    issued: Counter<u64>,
    refused: Counter<u64>,
    duration: Histogram<f64>,
    reloads: Counter<u64>,
}

impl IdentityMetrics {
    /// Registers the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        Self {
            issued: meter
                .u64_counter("sidemesh.identity.certificates.issued")
                .with_description("Workload certificates issued")
                .with_unit("{certificate}")
                .build(),
            refused: meter
                .u64_counter("sidemesh.identity.certificates.refused")
                .with_description("Certify requests refused, by reason")
                .with_unit("{request}")
                .build(),
            duration: meter
                .f64_histogram("sidemesh.identity.certify.duration")
                .with_description("Time to answer a Certify request, token review included")
                .with_unit("s")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            reloads: meter
                .u64_counter("sidemesh.identity.issuer.reloads")
                .with_description("Issuer reloads from changed files, by result")
                .with_unit("{reload}")
                .build(),
        }
    }

    /// Counts an issued certificate.
    pub fn issued(&self, seconds: f64) {
        self.issued.add(1, &[]);
        self.duration.record(seconds, &[KeyValue::new("outcome", "issued")]);
    }

    /// Counts a refusal.
    pub fn refused(&self, reason: &'static str, seconds: f64) {
        self.refused.add(1, &[KeyValue::new("reason", reason)]);
        self.duration.record(seconds, &[KeyValue::new("outcome", "refused")]);
    }

    /// Counts an issuer reload attempt.
    pub fn reload(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.reloads.add(1, &[KeyValue::new("result", result)]);
    }
}
