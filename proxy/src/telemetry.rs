//! The proxy's metrics and spans. Every instrument and attribute is listed in
//! `docs/metrics.md`; the names follow the OpenTelemetry HTTP semantic
//! conventions where they apply and use the `sidemesh.` prefix otherwise.
//!
//! Keeping the hot path cheap: the attributes that depend on the route (the
//! destination Service, the HTTPRoute, the backend) are built once per
//! discovery update into a [`RouteLabels`] and shared; the destination
//! workload of every endpoint likewise; a request then only clones a few
//! reference-counted strings into a fixed array. TCP connection counts and
//! bytes are plain atomics read by observable instruments when metrics are
//! collected, so bytes show up while a connection is open. With
//! `SIDEMESH_TELEMETRY=off` none of this runs.
//!
//! Bounded cardinality: no attribute holds a path, a port of a client, an
//! address or a request id; the values come from discovery (Services,
//! routes, backends, workload identities) and from the peer certificate. The
//! Prometheus page drops counter and histogram series idle for
//! `SIDEMESH_METRICS_IDLE_EXPIRY`, so peers that are gone disappear; the
//! SDK's cardinality limit (2000 attribute sets per instrument) caps the rest.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter, Histogram, Meter};
use opentelemetry::trace::SpanKind;
use sidemesh_telemetry::Traces;
use sidemesh_telemetry::metrics::LATENCY_BUCKETS;
use sidemesh_telemetry::traces::ActiveSpan;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::detect::Protocol;

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the application, to the outside.
    Outbound = 0,
    /// From the outside, to the application.
    Inbound = 1,
}

impl Direction {
    /// The `direction` attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// The `http.request.method` value: the method if it is a standard one, else
/// `_OTHER` (the semantic conventions' rule, which also bounds cardinality).
pub fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// Longest value accepted for a route-label field from a peer.
const MAX_LABEL_LEN: usize = 253;

/// The attributes a request gets from its route, shared by every request on
/// that route: `destination_service` (`namespace/name`), `route` (the
/// HTTPRoute's `namespace/name`) and `backend` (`namespace/name:port`), each
/// `""` when there is none. Also carried to the server proxy in the
/// [`crate::http::ROUTE_LABELS`] header so both sides label alike.
///
/// It also holds the instruments bound to the full attribute sets seen on
/// the route (method, status, workload, TLS), so that recording a request
/// neither builds nor hashes its attributes. The bindings live as long as
/// these labels (until the next discovery update of the Service), after
/// which the SDK may forget them.
#[derive(Debug)]
pub struct RouteLabels {
    service: KeyValue,
    route: KeyValue,
    backend: KeyValue,
    header: Option<HeaderValue>,
    bound: Mutex<Vec<BoundEntry>>,
}

/// Attribute sets bound per [`RouteLabels`]; past this, records take the
/// SDK's ordinary (hashing) path.
const MAX_BOUND: usize = 64;

/// What, besides the route, makes a request's attribute set.
#[derive(Debug)]
struct BoundKey<'a> {
    direction: Direction,
    method: &'static str,
    status: u16,
    mtls: bool,
    /// `destination_workload` (outbound) or `source_workload` (inbound).
    peer: Option<&'a KeyValue>,
}

/// Instruments bound to one attribute set, bound on first use.
struct BoundEntry {
    direction: Direction,
    method: &'static str,
    status: u16,
    mtls: bool,
    peer: Option<KeyValue>,
    duration: Option<BoundHistogram<f64>>,
    attempts: Option<BoundCounter<u64>>,
}

impl std::fmt::Debug for BoundEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundEntry")
            .field("method", &self.method)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl BoundEntry {
    fn matches(&self, k: &BoundKey<'_>) -> bool {
        self.direction == k.direction
            && self.status == k.status
            && self.mtls == k.mtls
            && self.method == k.method
            && match (&self.peer, k.peer) {
                (None, None) => true,
                (Some(a), Some(b)) => a.value.as_str() == b.value.as_str(),
                _ => false,
            }
    }
}

fn field(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

impl RouteLabels {
    /// Labels for `service`, `route` and `backend` (empty strings for none).
    pub fn new(service: &str, route: &str, backend: &str) -> Arc<Self> {
        let header = format!("{} {} {}", field(service), field(route), field(backend));
        Arc::new(Self {
            service: KeyValue::new("destination_service", Arc::<str>::from(service)),
            route: KeyValue::new("route", Arc::<str>::from(route)),
            backend: KeyValue::new("backend", Arc::<str>::from(backend)),
            header: HeaderValue::from_str(&header).ok(),
            bound: Mutex::default(),
        })
    }

    /// No Service, route or backend (a Pod or an unknown destination).
    pub fn none() -> Arc<Self> {
        static NONE: OnceLock<Arc<RouteLabels>> = OnceLock::new();
        NONE.get_or_init(|| {
            Arc::new(Self {
                service: KeyValue::new("destination_service", ""),
                route: KeyValue::new("route", ""),
                backend: KeyValue::new("backend", ""),
                header: None,
                bound: Mutex::default(),
            })
        })
        .clone()
    }

    /// The header value for the mesh hop.
    pub fn header(&self) -> Option<&HeaderValue> {
        self.header.as_ref()
    }

    /// Reads the header a client proxy sent; `None` if it is not three
    /// well-formed names (a peer cannot inject arbitrary label values).
    pub fn parse(v: &HeaderValue) -> Option<Arc<Self>> {
        let s = v.to_str().ok()?;
        let mut parts = s.split(' ');
        let (service, route, backend) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let ok = |p: &str| {
            p.len() <= MAX_LABEL_LEN
                && !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'/' | b':'))
        };
        if !(ok(service) && ok(route) && ok(backend)) {
            return None;
        }
        let un = |p: &'_ str| -> String { if p == "-" { String::new() } else { p.to_owned() } };
        Some(Self::new(&un(service), &un(route), &un(backend)))
    }

    fn short(&self) -> [KeyValue; 3] {
        [self.service.clone(), self.route.clone(), self.backend.clone()]
    }

    /// Runs `f` on the bound instruments of `key`'s attribute set (made on
    /// first use); `None` when this route already binds [`MAX_BOUND`] sets.
    fn bound<R>(&self, key: &BoundKey<'_>, f: impl FnOnce(&mut BoundEntry) -> R) -> Option<R> {
        let mut cache = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = cache.iter_mut().find(|e| e.matches(key)) {
            return Some(f(e));
        }
        if cache.len() >= MAX_BOUND {
            return None;
        }
        cache.push(BoundEntry {
            direction: key.direction,
            method: key.method,
            status: key.status,
            mtls: key.mtls,
            peer: key.peer.cloned(),
            duration: None,
            attempts: None,
        });
        cache.last_mut().map(f)
    }
}

/// A workload identity as a `destination_workload` or `source_workload` value.
pub fn workload(key: &'static str, id: &str) -> KeyValue {
    KeyValue::new(key, Arc::<str>::from(id))
}

/// What the outbound side learned about a request while routing it.
#[derive(Debug)]
pub struct Outcome {
    /// `http.request.method`.
    pub method: &'static str,
    /// Route attributes.
    pub labels: Arc<RouteLabels>,
    /// `destination_workload` of the endpoint of the last attempt.
    pub workload: Option<KeyValue>,
    /// Whether the last attempt went over mesh mTLS.
    pub mtls: bool,
}

impl Outcome {
    /// A request of `method` not routed yet.
    pub fn new(method: &'static str) -> Self {
        Self {
            method,
            labels: RouteLabels::none(),
            workload: None,
            mtls: false,
        }
    }
}

/// The status a request is recorded with when its client went away before
/// the answer: 499, nginx's "client closed request". Istio records 0; a real
/// status keeps it in the same series, and it is not a 5xx (the server did
/// not fail, the client stopped waiting).
pub fn client_closed() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// Records a request when it ends: with its answer's status by
/// [`Finish::done`], or with [`client_closed`] if it is dropped unanswered
/// (hyper drops a request's future when its client goes away, and a request
/// nobody records would vanish from every success rate).
pub struct Finish<T, F: FnOnce(&T, StatusCode)> {
    value: T,
    record: Option<F>,
}

impl<T, F: FnOnce(&T, StatusCode)> Finish<T, F> {
    /// `record` gets `value` (what the request learned) and the status.
    pub fn new(value: T, record: F) -> Self {
        Self {
            value,
            record: Some(record),
        }
    }

    /// What the request learns on its way.
    pub fn value_mut(&mut self) -> &mut T {
        &mut self.value
    }

    /// The request was answered `status`.
    pub fn done(mut self, status: StatusCode) {
        if let Some(record) = self.record.take() {
            record(&self.value, status);
        }
    }
}

impl<T, F: FnOnce(&T, StatusCode)> Drop for Finish<T, F> {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record(&self.value, client_closed());
        }
    }
}

/// Connections opened and closed and bytes, per direction, as atomics.
#[derive(Debug, Default)]
pub struct TcpCounters {
    opened: [AtomicU64; 2],
    closed: [AtomicU64; 2],
    /// `[direction][read = 0 / write = 1]`.
    bytes: [[AtomicU64; 2]; 2],
}

/// Counts one connection as open until dropped.
#[derive(Debug)]
pub struct ConnGuard {
    counters: Option<(Arc<TcpCounters>, Direction)>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some((c, d)) = &self.counters {
            c.closed[*d as usize].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A stream whose bytes are counted as they pass (read = from the peer that
/// opened the connection, write = to it).
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    counters: Option<(Arc<TcpCounters>, Direction)>,
}

impl<S> Counted<S> {
    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn count(&self, rw: usize, n: usize) {
        if let Some((c, d)) = &self.counters {
            c.bytes[*d as usize][rw].fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.count(0, buf.filled().len().saturating_sub(before));
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.count(1, n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.count(1, n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Static attribute values, built once.
#[derive(Debug)]
struct Fixed {
    outbound: KeyValue,
    inbound: KeyValue,
    mtls: KeyValue,
    plaintext: KeyValue,
    no_source: KeyValue,
    no_destination: KeyValue,
    /// This proxy's identity as `source_workload` (outbound) and `destination_workload` (inbound).
    me_source: KeyValue,
    me_destination: KeyValue,
}

/// The synchronous instruments.
#[derive(Debug)]
struct Instruments {
    client_duration: Histogram<f64>,
    server_duration: Histogram<f64>,
    attempts: Counter<u64>,
    retries: Counter<u64>,
    budget_exhausted: Counter<u64>,
    timeouts: Counter<u64>,
    ejections: Counter<u64>,
    handshakes: Counter<u64>,
    detect: Counter<u64>,
    fixed: Fixed,
    tcp: Arc<TcpCounters>,
}

/// Which timeout fired.
#[derive(Debug, Clone, Copy)]
pub enum TimeoutKind {
    /// `timeouts.request`: the whole request, retries included.
    Request,
    /// `timeouts.backendRequest`: one attempt.
    BackendRequest,
}

/// The proxy's telemetry: instruments (unless turned off) and the tracer
/// (when spans are exported).
#[derive(Debug, Default)]
pub struct ProxyTelemetry {
    instruments: Option<Instruments>,
    traces: Option<Traces>,
}

impl ProxyTelemetry {
    /// Nothing recorded (`SIDEMESH_TELEMETRY=off`, and unit tests).
    pub fn off() -> Self {
        Self::default()
    }

    /// Registers the instruments on `meter`; `identity` is this proxy's
    /// SPIFFE ID (`""` without one).
    pub fn new(meter: &Meter, identity: &str, traces: Option<Traces>) -> Self {
        let duration = |name: &'static str, what: &'static str| {
            meter
                .f64_histogram(name)
                .with_description(what)
                .with_unit("s")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build()
        };
        let counter = |name: &'static str, what: &'static str, unit: &'static str| {
            meter.u64_counter(name).with_description(what).with_unit(unit).build()
        };
        let tcp = Arc::new(TcpCounters::default());
        register_tcp(meter, tcp.clone());
        let instruments = Instruments {
            client_duration: duration(
                "http.client.request.duration",
                "Outbound HTTP requests as the application sees them (retries included), to the response head",
            ),
            server_duration: duration(
                "http.server.request.duration",
                "Inbound HTTP requests delivered to the application, to the response head",
            ),
            attempts: counter(
                "sidemesh.http.attempts",
                "Outbound HTTP attempts (the first try and each retry), by the attempt's status code",
                "{attempt}",
            ),
            retries: counter("sidemesh.retries", "Retries sent", "{retry}"),
            budget_exhausted: counter(
                "sidemesh.retry.budget.exhausted",
                "Retries not sent because the retry budget was spent (the failure was returned)",
                "{retry}",
            ),
            timeouts: counter(
                "sidemesh.timeouts",
                "Requests (kind=request) or attempts (kind=backend_request) that ran out of time",
                "{timeout}",
            ),
            ejections: counter(
                "sidemesh.endpoint.ejections",
                "Endpoints ejected from load balancing after consecutive failures",
                "{ejection}",
            ),
            handshakes: counter(
                "sidemesh.tls.handshakes",
                "Mesh mTLS handshakes, by direction and result",
                "{handshake}",
            ),
            detect: counter(
                "sidemesh.detect.results",
                "Protocol detection on new connections, by detected protocol",
                "{connection}",
            ),
            fixed: Fixed {
                outbound: KeyValue::new("direction", "outbound"),
                inbound: KeyValue::new("direction", "inbound"),
                mtls: KeyValue::new("tls", "mtls"),
                plaintext: KeyValue::new("tls", "plaintext"),
                no_source: KeyValue::new("source_workload", ""),
                no_destination: KeyValue::new("destination_workload", ""),
                me_source: workload("source_workload", identity),
                me_destination: workload("destination_workload", identity),
            },
            tcp,
        };
        Self {
            instruments: Some(instruments),
            traces,
        }
    }

    /// Whether spans are exported.
    pub fn traces(&self) -> Option<&Traces> {
        self.traces.as_ref()
    }

    /// Exports what is left (spans; metrics flush with the meter provider).
    pub async fn shutdown(&self) {
        if let Some(t) = &self.traces {
            t.shutdown().await;
        }
    }

    /// Registers the discovery stream gauges.
    pub fn register_discovery(&self, meter: &Meter, discovery: crate::discovery::Discovery) {
        if self.instruments.is_none() || !discovery.enabled() {
            return;
        }
        let d = discovery.clone();
        meter
            .u64_observable_gauge("sidemesh.discovery.stream.state")
            .with_description("1 while the stream to the destination service is up, 0 while it is down")
            .with_callback(move |obs| obs.observe(u64::from(d.connected()), &[]))
            .build();
        meter
            .u64_observable_gauge("sidemesh.discovery.targets")
            .with_description("Original destinations this proxy follows in discovery")
            .with_unit("{target}")
            .with_callback(move |obs| obs.observe(discovery.targets() as u64, &[]))
            .build();
    }

    /// A new connection on `direction`'s listener; closed when the guard drops.
    pub fn conn_opened(&self, direction: Direction) -> ConnGuard {
        let counters = self.instruments.as_ref().map(|i| {
            i.tcp.opened[direction as usize].fetch_add(1, Ordering::Relaxed);
            (i.tcp.clone(), direction)
        });
        ConnGuard { counters }
    }

    /// Wraps a connection's downstream stream so its bytes are counted.
    pub fn counted<S>(&self, stream: S, direction: Direction) -> Counted<S> {
        Counted {
            inner: stream,
            counters: self.instruments.as_ref().map(|i| (i.tcp.clone(), direction)),
        }
    }

    /// Protocol detection said `protocol`.
    pub fn detected(&self, direction: Direction, protocol: Protocol) {
        if let Some(i) = &self.instruments {
            let p = match protocol {
                Protocol::Http1 => "http1",
                Protocol::Http2 => "http2",
                Protocol::Tls => "tls",
                Protocol::Opaque => "opaque",
            };
            let d = match direction {
                Direction::Outbound => &i.fixed.outbound,
                Direction::Inbound => &i.fixed.inbound,
            };
            i.detect.add(1, &[d.clone(), KeyValue::new("protocol", p)]);
        }
    }

    /// A mesh mTLS handshake finished (`ok`) or failed.
    pub fn handshake(&self, direction: Direction, ok: bool) {
        if let Some(i) = &self.instruments {
            let d = match direction {
                Direction::Outbound => &i.fixed.outbound,
                Direction::Inbound => &i.fixed.inbound,
            };
            let result = if ok { "success" } else { "failure" };
            i.handshakes.add(1, &[d.clone(), KeyValue::new("result", result)]);
        }
    }

    /// A retry is sent on `labels`' route.
    pub fn retry(&self, labels: &RouteLabels) {
        if let Some(i) = &self.instruments {
            i.retries.add(1, &labels.short());
        }
    }

    /// A retry was refused by the budget.
    pub fn budget_exhausted(&self, labels: &RouteLabels) {
        if let Some(i) = &self.instruments {
            i.budget_exhausted.add(1, &labels.short());
        }
    }

    /// A timeout fired.
    pub fn timeout(&self, kind: TimeoutKind, labels: &RouteLabels) {
        if let Some(i) = &self.instruments {
            let kind = match kind {
                TimeoutKind::Request => "request",
                TimeoutKind::BackendRequest => "backend_request",
            };
            let [s, r, b] = labels.short();
            i.timeouts.add(1, &[s, r, b, KeyValue::new("kind", kind)]);
        }
    }

    /// An endpoint of `labels`' backend was ejected.
    pub fn ejection(&self, labels: &RouteLabels) {
        if let Some(i) = &self.instruments {
            let [s, _, b] = labels.short();
            i.ejections.add(1, &[s, b]);
        }
    }

    fn outbound_attrs(i: &Instruments, o: &Outcome, status: u16) -> [KeyValue; 9] {
        let f = &i.fixed;
        [
            f.outbound.clone(),
            f.me_source.clone(),
            o.workload.clone().unwrap_or_else(|| f.no_destination.clone()),
            o.labels.service.clone(),
            o.labels.route.clone(),
            o.labels.backend.clone(),
            if o.mtls { f.mtls.clone() } else { f.plaintext.clone() },
            KeyValue::new("http.request.method", o.method),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ]
    }

    fn outbound_key(outcome: &Outcome, status: u16) -> BoundKey<'_> {
        BoundKey {
            direction: Direction::Outbound,
            method: outcome.method,
            status,
            mtls: outcome.mtls,
            peer: outcome.workload.as_ref(),
        }
    }

    /// One outbound attempt ended with `status` (the proxy's own answer when
    /// it failed before a response).
    pub fn attempt(&self, outcome: &Outcome, status: u16) {
        let Some(i) = &self.instruments else { return };
        let bound = outcome.labels.bound(&Self::outbound_key(outcome, status), |e| {
            e.attempts
                .get_or_insert_with(|| i.attempts.bind(&Self::outbound_attrs(i, outcome, status)))
                .add(1);
        });
        if bound.is_none() {
            i.attempts.add(1, &Self::outbound_attrs(i, outcome, status));
        }
    }

    /// A client span for an outbound request, when the request is sampled.
    pub fn client_span(&self, headers: &mut HeaderMap, method: &'static str) -> Option<ActiveSpan> {
        self.traces.as_ref()?.start(headers, SpanKind::Client, method)
    }

    /// A server span for an inbound request, when the request is sampled.
    pub fn server_span(&self, headers: &mut HeaderMap, method: &'static str) -> Option<ActiveSpan> {
        self.traces.as_ref()?.start(headers, SpanKind::Server, method)
    }

    /// An outbound request answered with `status`, `started` at its arrival.
    pub fn client_done(&self, started: Instant, status: StatusCode, outcome: &Outcome, span: Option<ActiveSpan>) {
        let Some(i) = &self.instruments else { return };
        let seconds = started.elapsed().as_secs_f64();
        let code = status.as_u16();
        let bound = outcome.labels.bound(&Self::outbound_key(outcome, code), |e| {
            e.duration
                .get_or_insert_with(|| i.client_duration.bind(&Self::outbound_attrs(i, outcome, code)))
                .record(seconds);
        });
        if bound.is_none() {
            i.client_duration
                .record(seconds, &Self::outbound_attrs(i, outcome, code));
        }
        if let Some(span) = span {
            let name = span_name(outcome.method, &outcome.labels);
            let error = status.is_client_error() || status.is_server_error();
            span.finish(Some(name), &Self::outbound_attrs(i, outcome, code), error);
        }
    }

    /// An inbound request answered with `status`: `source` is the peer's
    /// identity (`None` for plaintext), `labels` what its proxy said.
    pub fn server_done(
        &self,
        started: Instant,
        method: &'static str,
        status: StatusCode,
        source: Option<&KeyValue>,
        labels: &RouteLabels,
        span: Option<ActiveSpan>,
    ) {
        let Some(i) = &self.instruments else { return };
        let f = &i.fixed;
        let attrs = || {
            [
                f.inbound.clone(),
                source.cloned().unwrap_or_else(|| f.no_source.clone()),
                f.me_destination.clone(),
                labels.service.clone(),
                labels.route.clone(),
                labels.backend.clone(),
                if source.is_some() {
                    f.mtls.clone()
                } else {
                    f.plaintext.clone()
                },
                KeyValue::new("http.request.method", method),
                KeyValue::new("http.response.status_code", i64::from(status.as_u16())),
            ]
        };
        let seconds = started.elapsed().as_secs_f64();
        let key = BoundKey {
            direction: Direction::Inbound,
            method,
            status: status.as_u16(),
            mtls: source.is_some(),
            peer: source,
        };
        let bound = labels.bound(&key, |e| {
            e.duration
                .get_or_insert_with(|| i.server_duration.bind(&attrs()))
                .record(seconds);
        });
        if bound.is_none() {
            i.server_duration.record(seconds, &attrs());
        }
        if let Some(span) = span {
            span.finish(Some(span_name(method, labels)), &attrs(), status.is_server_error());
        }
    }

    /// Whether anything is recorded.
    pub fn enabled(&self) -> bool {
        self.instruments.is_some()
    }
}

/// `GET shop/reviews`, or the method alone without a Service.
fn span_name(method: &str, labels: &RouteLabels) -> String {
    let service = labels.service.value.as_str();
    if service.is_empty() {
        method.to_owned()
    } else {
        format!("{method} {service}")
    }
}

fn register_tcp(meter: &Meter, tcp: Arc<TcpCounters>) {
    let dirs = [Direction::Outbound, Direction::Inbound];
    let c = tcp.clone();
    meter
        .u64_observable_counter("sidemesh.tcp.connections.opened")
        .with_description("Connections accepted on the outbound and inbound listeners")
        .with_unit("{connection}")
        .with_callback(move |obs| {
            for d in dirs {
                obs.observe(
                    c.opened[d as usize].load(Ordering::Relaxed),
                    &[KeyValue::new("direction", d.as_str())],
                );
            }
        })
        .build();
    let c = tcp.clone();
    meter
        .u64_observable_counter("sidemesh.tcp.connections.closed")
        .with_description("Connections of the outbound and inbound listeners that ended")
        .with_unit("{connection}")
        .with_callback(move |obs| {
            for d in dirs {
                obs.observe(
                    c.closed[d as usize].load(Ordering::Relaxed),
                    &[KeyValue::new("direction", d.as_str())],
                );
            }
        })
        .build();
    let c = tcp.clone();
    meter
        .i64_observable_up_down_counter("sidemesh.tcp.connections.active")
        .with_description("Connections open now on the outbound and inbound listeners")
        .with_unit("{connection}")
        .with_callback(move |obs| {
            for d in dirs {
                let i = d as usize;
                // Read closed first: a connection closing in between cannot make it negative.
                let closed = c.closed[i].load(Ordering::Relaxed);
                let opened = c.opened[i].load(Ordering::Relaxed);
                let active = i64::try_from(opened.saturating_sub(closed)).unwrap_or(i64::MAX);
                obs.observe(active, &[KeyValue::new("direction", d.as_str())]);
            }
        })
        .build();
    meter
        .u64_observable_counter("sidemesh.tcp.bytes")
        .with_description(
            "Bytes on accepted connections, counted as they pass: read from the peer that opened the connection, or written to it",
        )
        .with_unit("By")
        .with_callback(move |obs| {
            for d in dirs {
                for (rw, name) in [(0, "read"), (1, "write")] {
                    obs.observe(
                        tcp.bytes[d as usize][rw].load(Ordering::Relaxed),
                        &[
                            KeyValue::new("direction", d.as_str()),
                            KeyValue::new("peer_direction", name),
                        ],
                    );
                }
            }
        })
        .build();
}

/// Per inbound connection: the peer's identity attribute and the route
/// labels its proxy sent, parsed once per distinct header value.
#[derive(Debug)]
pub struct InboundConn {
    /// `source_workload` (`None` for plaintext).
    pub source: Option<KeyValue>,
    labels: Mutex<Vec<(HeaderValue, Arc<RouteLabels>)>>,
}

/// Distinct route-label headers remembered per connection.
const LABEL_CACHE: usize = 32;

impl InboundConn {
    /// A connection from `source`.
    pub fn new(source: Option<KeyValue>) -> Self {
        Self {
            source,
            labels: Mutex::default(),
        }
    }

    /// The labels of a request's [`crate::http::ROUTE_LABELS`] header.
    pub fn labels(&self, header: Option<HeaderValue>) -> Arc<RouteLabels> {
        let Some(v) = header else {
            return RouteLabels::none();
        };
        let mut cache = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, l)) = cache.iter().find(|(h, _)| *h == v) {
            return l.clone();
        }
        let parsed = RouteLabels::parse(&v).unwrap_or_else(RouteLabels::none);
        if cache.len() < LABEL_CACHE {
            cache.push((v, parsed.clone()));
        }
        parsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_round_trip_and_refuse_junk() {
        let l = RouteLabels::new("shop/reviews", "", "shop/reviews-v2:80");
        let h = l.header().expect("header").clone();
        assert_eq!(h, "shop/reviews - shop/reviews-v2:80");
        let back = RouteLabels::parse(&h).expect("parse");
        assert_eq!(back.service.value.as_str(), "shop/reviews");
        assert_eq!(back.route.value.as_str(), "");
        assert_eq!(back.backend.value.as_str(), "shop/reviews-v2:80");
        for junk in ["a b", "a b c d", "A b c", "a b c\"", "  "] {
            assert!(RouteLabels::parse(&HeaderValue::from_static(junk)).is_none(), "{junk}");
        }
        let long = format!("{} - -", "a".repeat(300));
        assert!(RouteLabels::parse(&HeaderValue::from_str(&long).expect("hv")).is_none());
        assert!(RouteLabels::none().header().is_none());
    }

    #[test]
    fn bound_and_unbound_records_land_in_the_same_series() {
        let metrics = sidemesh_telemetry::Metrics::new("test").expect("metrics");
        let t = ProxyTelemetry::new(&metrics.meter("t"), "spiffe://td/ns/a/sa/client", None);
        let labels = RouteLabels::new("shop/web", "shop/r", "shop/web:80");
        let mut outcome = Outcome::new("GET");
        outcome.labels = labels.clone();
        outcome.workload = Some(workload("destination_workload", "spiffe://td/ns/shop/sa/web"));
        outcome.mtls = true;
        for status in [200, 200, 503] {
            t.attempt(&outcome, status);
            t.client_done(
                Instant::now(),
                StatusCode::from_u16(status).expect("status"),
                &outcome,
                None,
            );
        }
        // Past the binding limit the ordinary path counts the same way.
        for n in 0..MAX_BOUND as u16 + 5 {
            t.client_done(
                Instant::now(),
                StatusCode::from_u16(300 + n).expect("status"),
                &outcome,
                None,
            );
        }
        t.client_done(Instant::now(), StatusCode::OK, &outcome, None);
        let page = metrics.render();
        let line = |name: &str, status: u16| {
            page.lines()
                .find(|l| l.starts_with(name) && l.contains(&format!("http_response_status_code=\"{status}\"")))
                .map(|l| l.rsplit(' ').next().unwrap_or("").to_owned())
                .unwrap_or_default()
        };
        assert_eq!(line("http_client_request_duration_seconds_count{", 200), "3", "{page}");
        assert_eq!(line("http_client_request_duration_seconds_count{", 503), "1", "{page}");
        assert_eq!(line("sidemesh_http_attempts_total{", 200), "2", "{page}");
        let last = 300 + MAX_BOUND as u16 + 4;
        assert_eq!(line("http_client_request_duration_seconds_count{", last), "1", "{page}");
        let series = page
            .lines()
            .filter(|l| l.starts_with("http_client_request_duration_seconds_count{"))
            .count();
        assert_eq!(series, 2 + MAX_BOUND + 5, "{page}");
        assert!(
            page.contains("destination_workload=\"spiffe://td/ns/shop/sa/web\""),
            "{page}"
        );
        assert!(
            page.contains("source_workload=\"spiffe://td/ns/a/sa/client\""),
            "{page}"
        );
    }

    #[test]
    fn methods_are_bounded() {
        assert_eq!(method_name(&Method::GET), "GET");
        assert_eq!(method_name(&Method::from_bytes(b"PURGE").expect("m")), "_OTHER");
    }
}
