//! The destination service's instruments (OpenTelemetry, read out as
//! Prometheus text on the admin endpoint).

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, UpDownCounter};
use sidemesh_telemetry::metrics::LATENCY_BUCKETS;

use crate::objects::Kind;

/// Instruments of the destination service.
#[derive(Clone, Debug)]
pub struct DestinationMetrics {
    streams: UpDownCounter<i64>,
    subscriptions: UpDownCounter<i64>,
    updates: Counter<u64>,
    lag: Histogram<f64>,
    refused: Counter<u64>,
    synced: Gauge<u64>,
    source_errors: Counter<u64>,
    source_updates: Counter<u64>,
    objects: Gauge<u64>,
    route_problems: Gauge<u64>,
    invalid_annotations: Gauge<u64>,
}

impl DestinationMetrics {
    /// Registers the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        Self {
            streams: meter
                .i64_up_down_counter("sidemesh.destination.streams")
                .with_description("Open Discover streams")
                .with_unit("{stream}")
                .build(),
            subscriptions: meter
                .i64_up_down_counter("sidemesh.destination.subscriptions")
                .with_description("Active subscriptions over all streams")
                .with_unit("{subscription}")
                .build(),
            updates: meter
                .u64_counter("sidemesh.destination.updates")
                .with_description("Discovery updates sent, by result (service, pod, unknown)")
                .with_unit("{update}")
                .build(),
            lag: meter
                .f64_histogram("sidemesh.destination.update.lag")
                .with_description("Time from a source change to the update being handed to the stream")
                .with_unit("s")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            refused: meter
                .u64_counter("sidemesh.destination.requests.refused")
                .with_description("Discover streams ended for a bad request, by reason")
                .with_unit("{request}")
                .build(),
            synced: meter
                .u64_gauge("sidemesh.destination.source.synced")
                .with_description("1 once the source has delivered its complete initial state")
                .build(),
            source_errors: meter
                .u64_counter("sidemesh.destination.source.errors")
                .with_description("Source errors (unparsable file, failed list or watch), by source and kind")
                .with_unit("{error}")
                .build(),
            source_updates: meter
                .u64_counter("sidemesh.destination.source.updates")
                .with_description("Changes taken from the source (events, relists, file reloads)")
                .with_unit("{update}")
                .build(),
            objects: meter
                .u64_gauge("sidemesh.destination.index.objects")
                .with_description("Objects in the index, by kind")
                .with_unit("{object}")
                .build(),
            route_problems: meter
                .u64_gauge("sidemesh.destination.route.problems")
                .with_description(
                    "HTTPRoute problems now: rules dropped as invalid, backendRefs that do not resolve, parents not found, filters ignored; by reason",
                )
                .with_unit("{problem}")
                .build(),
            invalid_annotations: meter
                .u64_gauge("sidemesh.destination.annotations.invalid")
                .with_description("Services whose annotation value is ignored as invalid, by annotation")
                .with_unit("{service}")
                .build(),
        }
    }

    /// A stream opened (`+1`) or closed (`-1`).
    pub fn stream(&self, delta: i64) {
        self.streams.add(delta, &[]);
    }

    /// Subscriptions added or removed.
    pub fn subscriptions(&self, delta: i64) {
        if delta != 0 {
            self.subscriptions.add(delta, &[]);
        }
    }

    /// An update handed to a stream, `lag` seconds after the change behind it.
    pub fn update_sent(&self, result: &'static str, lag: Option<f64>) {
        self.updates.add(1, &[KeyValue::new("result", result)]);
        if let Some(lag) = lag {
            self.lag.record(lag, &[]);
        }
    }

    /// A stream refused for `reason`.
    pub fn refused(&self, reason: &'static str) {
        self.refused.add(1, &[KeyValue::new("reason", reason)]);
    }

    /// Whether `source` has synced.
    pub fn synced(&self, source: &'static str, synced: bool) {
        self.synced
            .record(u64::from(synced), &[KeyValue::new("source", source)]);
    }

    /// A source error.
    pub fn source_error(&self, source: &'static str, kind: &'static str) {
        self.source_errors
            .add(1, &[KeyValue::new("source", source), KeyValue::new("kind", kind)]);
    }

    /// Changes applied from a source.
    pub fn source_updates(&self, n: u64) {
        self.source_updates.add(n, &[]);
    }

    /// The index holds `n` objects of `kind`.
    pub fn objects(&self, kind: Kind, n: usize) {
        self.objects.record(n as u64, &[KeyValue::new("kind", kind.as_str())]);
    }

    /// `n` route problems of `reason` now.
    pub fn route_problems(&self, reason: &'static str, n: u64) {
        self.route_problems.record(n, &[KeyValue::new("reason", reason)]);
    }

    /// `n` Services carry an invalid `annotation` now.
    pub fn invalid_annotations(&self, annotation: &'static str, n: u64) {
        self.invalid_annotations
            .record(n, &[KeyValue::new("annotation", annotation)]);
    }
}
