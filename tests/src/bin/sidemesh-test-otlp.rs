//! A small OTLP/gRPC receiver for end-to-end tests, built on the official
//! OTLP protos (`opentelemetry-proto`): it accepts metrics and traces
//! exports like a collector would and appends what it received to a file,
//! one JSON object per metric data point or span, so a test can read it.
//!
//! `sidemesh-test-otlp <listen addr> <out file>`
//!
//! With `SIDEMESH_TEST_OTLP_COUNT_ONLY=1` spans are only counted (one line
//! `{"signal":"span_count","total":N}` per export), so that a benchmark's
//! receiver costs little more than decoding.
//!
//! Each line is either
//! `{"signal":"metric","resource":{…},"scope":…,"name":…,"unit":…,"type":"sum|gauge|histogram",
//!   "monotonic":…,"temporality":…,"attributes":{…},"value":…,"count":…}` or
//! `{"signal":"span","resource":{…},"trace_id":hex,"span_id":hex,"parent_span_id":hex,
//!   "name":…,"kind":"client|server|…","attributes":{…},"status":…}`.
#![forbid(unsafe_code)]

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use serde_json::{Map, Value, json};

#[derive(Clone)]
struct Sink {
    out: Arc<Mutex<std::fs::File>>,
    count_only: bool,
    spans: Arc<std::sync::atomic::AtomicU64>,
}

impl Sink {
    fn write(&self, lines: Vec<Value>) {
        let mut f = self.out.lock().unwrap_or_else(|p| p.into_inner());
        for l in lines {
            let _ = writeln!(f, "{l}");
        }
        let _ = f.flush();
    }
}

fn any(v: &Option<AnyValue>) -> Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        Some(other) => json!(format!("{other:?}")),
        None => Value::Null,
    }
}

fn attrs(kvs: &[KeyValue]) -> Value {
    Value::Object(
        kvs.iter()
            .map(|kv| (kv.key.clone(), any(&kv.value)))
            .collect::<Map<_, _>>(),
    )
}

fn temporality(t: i32) -> &'static str {
    match t {
        1 => "delta",
        2 => "cumulative",
        _ => "unspecified",
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut lines = Vec::new();
        for rm in &req.get_ref().resource_metrics {
            let resource = attrs(rm.resource.as_ref().map(|r| r.attributes.as_slice()).unwrap_or(&[]));
            for sm in &rm.scope_metrics {
                let scope = sm.scope.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                for m in &sm.metrics {
                    let base = json!({
                        "signal": "metric", "resource": resource, "scope": scope,
                        "name": m.name, "unit": m.unit, "description": m.description,
                    });
                    let mut point = |kind: &str, extra: Value| {
                        let mut line = base.clone();
                        if let (Some(l), Some(e)) = (line.as_object_mut(), extra.as_object()) {
                            l.insert("type".into(), json!(kind));
                            l.extend(e.clone());
                        }
                        lines.push(line);
                    };
                    let number = |v: &Option<number_data_point::Value>| match v {
                        Some(number_data_point::Value::AsDouble(d)) => json!(d),
                        Some(number_data_point::Value::AsInt(i)) => json!(i),
                        None => Value::Null,
                    };
                    match &m.data {
                        Some(metric::Data::Sum(s)) => {
                            for p in &s.data_points {
                                point(
                                    "sum",
                                    json!({ "monotonic": s.is_monotonic, "temporality": temporality(s.aggregation_temporality),
                                            "attributes": attrs(&p.attributes), "value": number(&p.value) }),
                                );
                            }
                        }
                        Some(metric::Data::Gauge(g)) => {
                            for p in &g.data_points {
                                point(
                                    "gauge",
                                    json!({ "attributes": attrs(&p.attributes), "value": number(&p.value) }),
                                );
                            }
                        }
                        Some(metric::Data::Histogram(h)) => {
                            for p in &h.data_points {
                                point(
                                    "histogram",
                                    json!({ "temporality": temporality(h.aggregation_temporality),
                                            "attributes": attrs(&p.attributes), "count": p.count, "sum": p.sum,
                                            "bounds": p.explicit_bounds }),
                                );
                            }
                        }
                        Some(other) => point(
                            "other",
                            json!({ "data": format!("{other:?}").chars().take(200).collect::<String>() }),
                        ),
                        None => {}
                    }
                }
            }
        }
        self.write(lines);
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.count_only {
            let n: usize = req
                .get_ref()
                .resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len())
                .sum();
            let total = self.spans.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed) + n as u64;
            self.write(vec![json!({ "signal": "span_count", "total": total })]);
            return Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }));
        }
        let mut lines = Vec::new();
        for rs in &req.get_ref().resource_spans {
            let resource = attrs(rs.resource.as_ref().map(|r| r.attributes.as_slice()).unwrap_or(&[]));
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    let kind = match s.kind {
                        1 => "internal",
                        2 => "server",
                        3 => "client",
                        4 => "producer",
                        5 => "consumer",
                        _ => "unspecified",
                    };
                    lines.push(json!({
                        "signal": "span", "resource": resource,
                        "trace_id": hex::encode(&s.trace_id), "span_id": hex::encode(&s.span_id),
                        "parent_span_id": hex::encode(&s.parent_span_id), "name": s.name, "kind": kind,
                        "attributes": attrs(&s.attributes),
                        "status": s.status.as_ref().map(|st| st.code).unwrap_or(0),
                        "duration_ns": s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano),
                    }));
                }
            }
        }
        self.write(lines);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(out)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: sidemesh-test-otlp <listen addr> <out file>");
        std::process::exit(2);
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(PathBuf::from(out))?;
    let sink = Sink {
        out: Arc::new(Mutex::new(file)),
        count_only: std::env::var("SIDEMESH_TEST_OTLP_COUNT_ONLY").is_ok_and(|v| v == "1"),
        spans: Arc::default(),
    };
    tonic::transport::Server::builder()
        .add_service(MetricsServiceServer::new(sink.clone()))
        .add_service(TraceServiceServer::new(sink))
        .serve(listen.parse()?)
        .await?;
    Ok(())
}
