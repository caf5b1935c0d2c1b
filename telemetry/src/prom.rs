//! The Prometheus side of the meter provider: a pull reader whose
//! collections are rendered as Prometheus text, with the usual OTel →
//! Prometheus naming (dots to underscores, a unit suffix such as `_seconds`
//! or `_bytes`, `_total` on counters — the names `opentelemetry-prometheus`
//! and the collector's Prometheus exporter produce).
//!
//! Why not `opentelemetry-prometheus`: with cumulative temporality the SDK
//! keeps every attribute set it ever saw, so the series of a peer that is
//! gone (a deleted Service, route or workload identity) would stay on
//! `/metrics` until the process restarts. This reader asks the SDK for
//! *low-memory* temporality — synchronous counters and histograms are
//! collected as deltas, and the SDK forgets an attribute set that saw no
//! update since the previous collection — and adds the deltas up itself. A
//! series that has not moved for the configured idle time is then dropped
//! from the page (delta-to-cumulative with expiry, as the collector's
//! `deltatocumulative` processor does). Everything else (gauges, up-down
//! counters, observable instruments) stays cumulative in the SDK and is shown
//! exactly as collected, so an observation that stops disappears at once.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};

/// The reader registered with the meter provider; [`PromStore`] keeps a
/// second handle and collects through it at every scrape.
#[derive(Debug, Clone)]
pub(crate) struct PromReader(Arc<ManualReader>);

impl PromReader {
    pub(crate) fn new() -> Self {
        Self(Arc::new(
            ManualReader::builder().with_temporality(Temporality::LowMemory).build(),
        ))
    }
}

impl MetricReader for PromReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// What a Prometheus family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// Sorted, sanitized label pairs of one series.
type Labels = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq)]
enum Sample {
    Scalar(f64),
    Histogram {
        bounds: Vec<f64>,
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

impl Sample {
    /// Adds a delta; a histogram whose bounds changed starts over.
    fn add(&mut self, delta: Sample) {
        match (self, delta) {
            (Self::Scalar(v), Self::Scalar(d)) => *v += d,
            (
                Self::Histogram {
                    bounds,
                    counts,
                    sum,
                    count,
                },
                Self::Histogram {
                    bounds: b,
                    counts: c,
                    sum: s,
                    count: n,
                },
            ) if *bounds == b && counts.len() == c.len() => {
                for (acc, d) in counts.iter_mut().zip(c) {
                    *acc += d;
                }
                *sum += s;
                *count += n;
            }
            (this, delta) => *this = delta,
        }
    }
}

#[derive(Debug)]
struct Series {
    sample: Sample,
    updated: Instant,
}

#[derive(Debug)]
struct Family {
    help: String,
    kind: Kind,
    /// Collected as deltas and added up here (subject to expiry).
    delta: bool,
    series: HashMap<Labels, Series>,
}

/// The accumulated state behind `/metrics`.
#[derive(Debug)]
pub(crate) struct PromStore {
    reader: PromReader,
    idle_expiry: Option<Duration>,
    families: Mutex<BTreeMap<String, Family>>,
}

impl PromStore {
    pub(crate) fn new(reader: PromReader, idle_expiry: Option<Duration>) -> Self {
        Self {
            reader,
            idle_expiry,
            families: Mutex::default(),
        }
    }

    /// Collects from the SDK and renders the page.
    pub(crate) fn render(&self) -> String {
        let mut rm = ResourceMetrics::default();
        // One scrape at a time: every delta of a collection must land.
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        match self.reader.collect(&mut rm) {
            Ok(()) => ingest(&mut families, &rm, Instant::now(), self.idle_expiry),
            // After shutdown (the process is exiting) the last state is shown.
            Err(e) => tracing::debug!(error = %e, "collecting metrics"),
        }
        let mut out = String::with_capacity(8192);
        write_text(&families, &mut out);
        out
    }
}

/// Prometheus name of a UCUM unit, per the OTel → Prometheus compatibility
/// rules; annotations such as `{request}` and unknown units add nothing.
fn unit_name(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" | "B" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tibibytes",
        "KBy" | "KB" => "kilobytes",
        "MBy" | "MB" => "megabytes",
        "GBy" | "GB" => "gigabytes",
        "TBy" | "TB" => "terabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "1" => "ratio",
        "%" => "percent",
        _ => return None,
    })
}

/// The `_per_<x>` part of a rate unit such as `By/s`.
fn per_unit_name(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        _ => return None,
    })
}

/// The suffix a unit adds to a metric name, without the leading `_`.
fn unit_suffix(unit: &str) -> Option<String> {
    if let Some(name) = unit_name(unit) {
        return Some(name.to_owned());
    }
    let (first, second) = unit.split_once('/')?;
    let per = per_unit_name(second)?;
    // "1/s" is "per_second", not "ratio_per_second".
    let dimensionless = ["1", "d", "h", "min", "s", "ms", "us", "ns"].contains(&first);
    match unit_name(first) {
        Some(f) if !dimensionless => Some(format!("{f}_per_{per}")),
        _ => Some(format!("per_{per}")),
    }
}

/// A metric or label name with every character Prometheus does not allow
/// replaced by `_` (a leading digit gets a `_` in front).
fn sanitize(name: &str, allow_colon: bool) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || (allow_colon && c == ':') {
            c
        } else {
            '_'
        }
    }));
    out
}

/// The Prometheus name of an OTel instrument. As the collector's translator
/// does, a unit already in the name is not repeated (`sidemesh.tcp.bytes` in
/// `By` is `sidemesh_tcp_bytes_total`, not `…_bytes_bytes_total`).
fn prom_name(metric: &Metric, kind: Kind, monotonic: bool) -> String {
    let mut name = sanitize(metric.name(), true);
    if let Some(suffix) = unit_suffix(metric.unit())
        && !name.ends_with(&format!("_{suffix}"))
    {
        name.push('_');
        name.push_str(&suffix);
    }
    if kind == Kind::Counter && monotonic && !name.ends_with("_total") {
        name.push_str("_total");
    }
    name
}

fn labels<'a>(attrs: impl Iterator<Item = &'a KeyValue>) -> Labels {
    let mut out: Labels = attrs
        .map(|kv| (sanitize(kv.key.as_str(), false), kv.value.as_str().into_owned()))
        .collect();
    out.sort();
    // Two OTel keys may sanitize to one label (`a.b` and `a_b`): keep the values joined.
    out.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            earlier.1.push(';');
            earlier.1.push_str(&later.1);
            true
        } else {
            false
        }
    });
    out
}

/// One collected instrument as (kind, monotonic, delta, series).
type Collected = (Kind, bool, bool, Vec<(Labels, Sample)>);

fn collected(data: &AggregatedMetrics) -> Option<Collected> {
    macro_rules! convert {
        ($md:expr) => {
            match $md {
                MetricData::Gauge(g) => Some((
                    Kind::Gauge,
                    false,
                    false,
                    g.data_points()
                        .map(|p| (labels(p.attributes()), Sample::Scalar(p.value() as f64)))
                        .collect(),
                )),
                MetricData::Sum(s) => Some((
                    if s.is_monotonic() {
                        Kind::Counter
                    } else {
                        Kind::Gauge
                    },
                    s.is_monotonic(),
                    s.temporality() == Temporality::Delta,
                    s.data_points()
                        .map(|p| (labels(p.attributes()), Sample::Scalar(p.value() as f64)))
                        .collect(),
                )),
                MetricData::Histogram(h) => Some((
                    Kind::Histogram,
                    false,
                    h.temporality() == Temporality::Delta,
                    h.data_points()
                        .map(|p| {
                            (
                                labels(p.attributes()),
                                Sample::Histogram {
                                    bounds: p.bounds().collect(),
                                    counts: p.bucket_counts().collect(),
                                    sum: p.sum() as f64,
                                    count: p.count(),
                                },
                            )
                        })
                        .collect(),
                )),
                // Never configured by sidemesh; Prometheus text has no exact form for it.
                MetricData::ExponentialHistogram(_) => None,
            }
        };
    }
    match data {
        AggregatedMetrics::F64(md) => convert!(md),
        AggregatedMetrics::U64(md) => convert!(md),
        AggregatedMetrics::I64(md) => convert!(md),
    }
}

/// Merges one collection into the families.
fn ingest(families: &mut BTreeMap<String, Family>, rm: &ResourceMetrics, now: Instant, idle_expiry: Option<Duration>) {
    let mut seen: Vec<String> = Vec::new();
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            let Some((kind, monotonic, delta, points)) = collected(metric.data()) else {
                continue;
            };
            let name = prom_name(metric, kind, monotonic);
            let family = families.entry(name.clone()).or_insert_with(|| Family {
                help: metric.description().to_owned(),
                kind,
                delta,
                series: HashMap::new(),
            });
            if family.kind != kind {
                // Two instruments claim one name with different types: the first keeps it.
                tracing::debug!(metric = %name, "instrument type conflict; dropped");
                continue;
            }
            if family.delta != delta {
                family.series.clear();
                family.delta = delta;
            }
            if !delta && !seen.contains(&name) {
                // Cumulative: the collection is the whole truth.
                family.series.clear();
            }
            for (labels, sample) in points {
                match family.series.get_mut(&labels) {
                    Some(s) if delta => {
                        s.sample.add(sample);
                        s.updated = now;
                    }
                    Some(s) => {
                        s.sample = sample;
                        s.updated = now;
                    }
                    None => {
                        family.series.insert(labels, Series { sample, updated: now });
                    }
                }
            }
            seen.push(name);
        }
    }
    families.retain(|name, family| {
        if family.delta {
            if let Some(idle) = idle_expiry {
                family
                    .series
                    .retain(|_, s| now.saturating_duration_since(s.updated) < idle);
            }
            !family.series.is_empty()
        } else {
            // A cumulative instrument missing from the collection has nothing to show.
            seen.contains(name)
        }
    });
}

/// A float as Prometheus text writes it.
fn number(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

fn escape_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_labels(out: &mut String, labels: &Labels, le: Option<f64>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        escape_value(out, v);
        out.push('"');
    }
    if let Some(le) = le {
        if !first {
            out.push(',');
        }
        out.push_str("le=\"");
        number(out, le);
        out.push('"');
    }
    out.push('}');
}

fn write_text(families: &BTreeMap<String, Family>, out: &mut String) {
    for (name, family) in families {
        if family.series.is_empty() {
            continue;
        }
        let help = family.help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {}", family.kind.as_str());
        let mut series: Vec<(&Labels, &Series)> = family.series.iter().collect();
        series.sort_by(|a, b| a.0.cmp(b.0));
        for (labels, s) in series {
            match &s.sample {
                Sample::Scalar(v) => {
                    out.push_str(name);
                    write_labels(out, labels, None);
                    out.push(' ');
                    number(out, *v);
                    out.push('\n');
                }
                Sample::Histogram {
                    bounds,
                    counts,
                    sum,
                    count,
                } => {
                    let mut cumulative = 0u64;
                    for (i, bound) in bounds.iter().enumerate() {
                        cumulative += counts.get(i).copied().unwrap_or(0);
                        let _ = write!(out, "{name}_bucket");
                        write_labels(out, labels, Some(*bound));
                        let _ = writeln!(out, " {cumulative}");
                    }
                    let _ = write!(out, "{name}_bucket");
                    write_labels(out, labels, Some(f64::INFINITY));
                    let _ = writeln!(out, " {count}");
                    let _ = write!(out, "{name}_sum");
                    write_labels(out, labels, None);
                    out.push(' ');
                    number(out, *sum);
                    out.push('\n');
                    let _ = write!(out, "{name}_count");
                    write_labels(out, labels, None);
                    let _ = writeln!(out, " {count}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::SdkMeterProvider;

    fn setup(
        idle: Option<Duration>,
    ) -> (
        SdkMeterProvider,
        PromReader,
        Mutex<BTreeMap<String, Family>>,
        Option<Duration>,
    ) {
        let reader = PromReader::new();
        let provider = SdkMeterProvider::builder().with_reader(reader.clone()).build();
        (provider, reader, Mutex::default(), idle)
    }

    fn scrape(
        reader: &PromReader,
        fams: &Mutex<BTreeMap<String, Family>>,
        now: Instant,
        idle: Option<Duration>,
    ) -> String {
        let mut rm = ResourceMetrics::default();
        reader.collect(&mut rm).expect("collect");
        let mut f = fams.lock().expect("lock");
        ingest(&mut f, &rm, now, idle);
        let mut out = String::new();
        write_text(&f, &mut out);
        out
    }

    #[test]
    fn names_follow_the_otel_prometheus_rules() {
        assert_eq!(unit_suffix("s").as_deref(), Some("seconds"));
        assert_eq!(unit_suffix("By").as_deref(), Some("bytes"));
        assert_eq!(unit_suffix("By/s").as_deref(), Some("bytes_per_second"));
        assert_eq!(unit_suffix("1/s").as_deref(), Some("per_second"));
        assert_eq!(unit_suffix("{request}"), None);
        assert_eq!(unit_suffix(""), None);
        assert_eq!(
            sanitize("http.client.request.duration", true),
            "http_client_request_duration"
        );
        assert_eq!(sanitize("1a-b", false), "_1a_b");
    }

    #[test]
    fn counters_accumulate_histograms_render_and_idle_series_expire() {
        let (provider, reader, fams, idle) = setup(Some(Duration::from_secs(60)));
        let meter = provider.meter("t");
        let c = meter.u64_counter("sidemesh.retries").with_unit("{retry}").build();
        let h = meter
            .f64_histogram("http.client.request.duration")
            .with_unit("s")
            .with_boundaries(vec![0.1, 1.0])
            .build();
        let g = meter.i64_up_down_counter("sidemesh.tcp.connections.active").build();
        let b = meter.u64_counter("sidemesh.tcp.bytes").with_unit("By").build();
        b.add(10, &[]);
        let t0 = Instant::now();
        c.add(2, &[KeyValue::new("route", "shop/r")]);
        h.record(0.05, &[KeyValue::new("http.request.method", "GET")]);
        h.record(0.5, &[KeyValue::new("http.request.method", "GET")]);
        g.add(3, &[]);
        let page = scrape(&reader, &fams, t0, idle);
        assert!(page.contains("# TYPE sidemesh_retries_total counter\n"), "{page}");
        assert!(page.contains("sidemesh_retries_total{route=\"shop/r\"} 2\n"), "{page}");
        assert!(
            page.contains("http_client_request_duration_seconds_bucket{http_request_method=\"GET\",le=\"0.1\"} 1\n"),
            "{page}"
        );
        assert!(
            page.contains("http_client_request_duration_seconds_bucket{http_request_method=\"GET\",le=\"1\"} 2\n"),
            "{page}"
        );
        assert!(
            page.contains("http_client_request_duration_seconds_bucket{http_request_method=\"GET\",le=\"+Inf\"} 2\n"),
            "{page}"
        );
        assert!(
            page.contains("http_client_request_duration_seconds_count{http_request_method=\"GET\"} 2\n"),
            "{page}"
        );
        assert!(page.contains("sidemesh_tcp_connections_active 3\n"), "{page}");
        assert!(
            page.contains("sidemesh_tcp_bytes_total 10\n"),
            "unit not repeated: {page}"
        );

        // Deltas add up across scrapes.
        c.add(1, &[KeyValue::new("route", "shop/r")]);
        let page = scrape(&reader, &fams, t0 + Duration::from_secs(30), idle);
        assert!(page.contains("sidemesh_retries_total{route=\"shop/r\"} 3\n"), "{page}");
        assert!(
            page.contains("http_client_request_duration_seconds_count{http_request_method=\"GET\"} 2\n"),
            "{page}"
        );

        // Idle past the expiry: the delta series go, the cumulative gauge stays.
        let page = scrape(&reader, &fams, t0 + Duration::from_secs(85), idle);
        assert!(
            page.contains("sidemesh_retries_total{route=\"shop/r\"} 3\n"),
            "updated 55 s ago: {page}"
        );
        assert!(!page.contains("http_client_request_duration"), "{page}");
        let page = scrape(&reader, &fams, t0 + Duration::from_secs(200), idle);
        assert!(!page.contains("sidemesh_retries_total"), "{page}");
        assert!(page.contains("sidemesh_tcp_connections_active 3\n"), "{page}");
        // Traffic again: the series comes back, counting from zero.
        c.add(1, &[KeyValue::new("route", "shop/r")]);
        let page = scrape(&reader, &fams, t0 + Duration::from_secs(201), idle);
        assert!(page.contains("sidemesh_retries_total{route=\"shop/r\"} 1\n"), "{page}");
    }

    #[test]
    fn without_expiry_series_stay_and_observations_that_stop_disappear() {
        let (provider, reader, fams, idle) = setup(None);
        let meter = provider.meter("t");
        let c = meter.u64_counter("x.events").build();
        let on = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = on.clone();
        let _gauge = meter
            .u64_observable_gauge("x.info")
            .with_callback(move |obs| {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    obs.observe(1, &[KeyValue::new("fingerprint", "ab\"c")]);
                }
            })
            .build();
        c.add(1, &[]);
        let t0 = Instant::now();
        let page = scrape(&reader, &fams, t0, idle);
        assert!(page.contains("x_info{fingerprint=\"ab\\\"c\"} 1\n"), "{page}");
        on.store(false, std::sync::atomic::Ordering::Relaxed);
        let page = scrape(&reader, &fams, t0 + Duration::from_secs(86400), idle);
        assert!(page.contains("x_events_total 1\n"), "{page}");
        assert!(!page.contains("x_info"), "{page}");
    }
}
