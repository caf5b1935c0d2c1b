//! The injector's instruments.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use sidemesh_telemetry::metrics::LATENCY_BUCKETS;

/// Instruments of the admission webhook.
#[derive(Clone, Debug)]
pub struct InjectorMetrics {
    admissions: Counter<u64>,
    duration: Histogram<f64>,
    reloads: Counter<u64>,
}

impl InjectorMetrics {
    /// Registers the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        Self {
            admissions: meter
                .u64_counter("sidemesh.injector.admissions")
                .with_description(
                    "AdmissionReviews answered, by outcome (injected, skipped, denied, malformed) and reason",
                )
                .with_unit("{review}")
                .build(),
            duration: meter
                .f64_histogram("sidemesh.injector.admission.duration")
                .with_description("Time to answer an AdmissionReview, body read to answer written")
                .with_unit("s")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            reloads: meter
                .u64_counter("sidemesh.injector.tls.reloads")
                .with_description("Serving certificate reloads from changed files, by result")
                .with_unit("{reload}")
                .build(),
        }
    }

    /// Counts one answered review.
    pub fn admission(&self, outcome: &'static str, reason: &'static str, seconds: f64) {
        self.admissions
            .add(1, &[KeyValue::new("outcome", outcome), KeyValue::new("reason", reason)]);
        self.duration.record(seconds, &[KeyValue::new("outcome", outcome)]);
    }

    /// Counts a serving certificate reload attempt.
    pub fn reload(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.reloads.add(1, &[KeyValue::new("result", result)]);
    }
}
