//! The outbound side: connections from the application, redirected to the
//! outbound port by iptables. The original destination is looked up in
//! discovery; HTTP is proxied request by request (to a meshed endpoint over
//! the pooled mTLS HTTP/2 connection, else plainly), everything else is
//! copied as TCP (over its own mTLS stream to a meshed endpoint). Unknown
//! destinations get exactly what they would have got without the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Either};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sidemesh_identity_client::SpiffeId;
use tokio::net::TcpStream;

use crate::Proxy;
use crate::detect::{self, Detected, Protocol};
use crate::discovery::Resolution;
use crate::endpoint::Endpoint;
use crate::http::{self as h, Body};
use crate::policy::{Rule, ServicePolicy, split};
use crate::retry::MAX_RETRY_BODY;
use crate::telemetry::{Counted, Direction, Finish, Outcome, RouteLabels, TimeoutKind, method_name};
use crate::tls::ALPN_HTTP1;

/// The application's side of a connection, its bytes counted.
type Downstream = Counted<TcpStream>;

/// An endpoint to send to.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    addr: SocketAddr,
    /// Set when the endpoint is meshed and we hold mesh TLS.
    identity: Option<&'a SpiffeId>,
}

fn endpoint_target<'a>(proxy: &Proxy, ep: &'a Endpoint) -> Option<Target<'a>> {
    Some(Target {
        addr: ep.addr?,
        identity: ep.identity.as_ref().filter(|_| proxy.pool.is_some()),
    })
}

/// Where a connection or request to a Pod IP goes: that Pod (its address as
/// discovery knows it, else the original destination), over mTLS if it is
/// meshed. `None` for a meshed Pod whose identity did not parse: refused, not
/// sent plaintext.
fn pod_target(ep: &Endpoint, orig: SocketAddr, mesh_tls: bool) -> Option<Target<'_>> {
    let identity = ep.identity.as_ref().filter(|_| mesh_tls);
    if ep.raw.meshed && mesh_tls && identity.is_none() {
        return None;
    }
    Some(Target {
        addr: ep.addr.unwrap_or(orig),
        identity,
    })
}

/// The backend of a Service for a whole TCP connection: the first rule's
/// weighted split (HTTPRoute matches are HTTP-only), else the Service itself.
fn tcp_backend(policy: &ServicePolicy) -> Option<(&str, &Arc<RouteLabels>)> {
    match policy.rules.first() {
        Some(rule) => split(&rule.backends).map(|b| (b.key.as_str(), &b.labels)),
        None => Some((&policy.default_key, &policy.default_labels)),
    }
}

fn is_opaque(proxy: &Proxy, orig: SocketAddr, resolution: &Resolution) -> bool {
    proxy.opaque_ports.contains(&orig.port())
        || matches!(resolution, Resolution::Service(s) if s.service.opaque)
        || matches!(resolution, Resolution::Pod(p) if p.raw.opaque)
        || matches!(resolution, Resolution::Unknown)
}

/// Handles one connection accepted on the outbound listener.
pub async fn handle(proxy: Arc<Proxy>, stream: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
    let proxy = &proxy;
    let _ = stream.set_nodelay(true);
    let orig = crate::socket::original_dst(&stream)?;
    if orig == stream.local_addr()? {
        // Not redirected: a client that talks to the proxy on purpose (no
        // iptables, as in the loopback demo). Only HTTP says where it goes.
        let detected = detect::detect_patiently(&stream, proxy.detect_timeout).await?;
        if !matches!(detected, Protocol::Http1 | Protocol::Http2) {
            anyhow::bail!("connection to {orig} was not redirected and is not HTTP; refusing to loop");
        }
        let stream = proxy.telemetry.counted(stream, Direction::Outbound);
        return serve_http(proxy.clone(), stream, None).await;
    }
    let resolution = proxy.discovery.resolve(orig).await;
    // Unknown destinations and opaque ports are never inspected: no waiting
    // for a client that expects the server to speak first.
    if is_opaque(proxy, orig, &resolution) {
        let stream = proxy.telemetry.counted(stream, Direction::Outbound);
        return forward_tcp(proxy, stream, orig, &resolution).await;
    }
    let detected = detect::detect_or_connect(&stream, proxy.detect_timeout, || {
        connect_opaque(proxy, orig, &resolution)
    })
    .await?;
    let protocol = match detected {
        Detected::Client(p) => p,
        Detected::Server { mut upstream, greeting } => {
            tracing::debug!(%peer, %orig, "outbound server-first");
            proxy.telemetry.detected(Direction::Outbound, Protocol::Opaque);
            let mut stream = proxy.telemetry.counted(stream, Direction::Outbound);
            crate::relay::relay_greeted(&mut stream, &mut upstream, &greeting).await?;
            return Ok(());
        }
        Detected::Closed => return Ok(()),
    };
    proxy.telemetry.detected(Direction::Outbound, protocol);
    tracing::debug!(%peer, %orig, ?protocol, "outbound");
    let stream = proxy.telemetry.counted(stream, Direction::Outbound);
    match protocol {
        Protocol::Http1 | Protocol::Http2 => serve_http(proxy.clone(), stream, Some(orig)).await,
        Protocol::Opaque | Protocol::Tls => forward_tcp(proxy, stream, orig, &resolution).await,
    }
}

/// Relays a whole connection as TCP to where discovery sends `orig`.
async fn forward_tcp(
    proxy: &Proxy,
    mut stream: Downstream,
    orig: SocketAddr,
    resolution: &Resolution,
) -> anyhow::Result<()> {
    let mut upstream = connect_opaque(proxy, orig, resolution).await?;
    crate::relay::relay(&mut stream, &mut upstream).await?;
    Ok(())
}

/// The upstream of an opaque connection: plain TCP, or a mesh mTLS stream.
trait Upstream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Upstream for T {}

/// Connects an opaque connection to `orig` where discovery says it goes (a
/// Service: the first rule's weighted split, balanced, over mTLS if meshed).
async fn connect_opaque(proxy: &Proxy, orig: SocketAddr, resolution: &Resolution) -> anyhow::Result<Box<dyn Upstream>> {
    let (target, pick) = match resolution {
        Resolution::Unknown => (
            Target {
                addr: orig,
                identity: None,
            },
            None,
        ),
        Resolution::Pod(ep) => (
            pod_target(ep, orig, proxy.pool.is_some())
                .ok_or_else(|| anyhow::anyhow!("{orig}: meshed Pod with an unusable identity; refusing plaintext"))?,
            None,
        ),
        Resolution::Service(policy) => {
            let (key, labels) =
                tcp_backend(policy).ok_or_else(|| anyhow::anyhow!("{orig}: every backend has weight 0"))?;
            let endpoints = policy.endpoints(key);
            let pick = proxy
                .balancer
                .pick(endpoints, &[])
                .ok_or_else(|| anyhow::anyhow!("{orig}: backend {key} has no endpoint"))?;
            let target = endpoint_target(proxy, &endpoints[pick.index])
                .ok_or_else(|| anyhow::anyhow!("{orig}: endpoint address unusable"))?;
            (target, Some((pick, labels)))
        }
    };
    let connected: Result<Box<dyn Upstream>, _> = match (&target.identity, &proxy.pool) {
        (Some(id), Some(pool)) => crate::pool::connect_mesh_tcp(pool.tls(), target.addr, id, &proxy.telemetry)
            .await
            .map(|s| Box::new(s) as Box<dyn Upstream>),
        _ => crate::pool::connect_tcp(target.addr)
            .await
            .map(|s| Box::new(s) as Box<dyn Upstream>),
    };
    if let Some((pick, labels)) = pick
        && proxy.balancer.done(pick, connected.is_ok())
    {
        proxy.telemetry.ejection(labels);
    }
    Ok(connected?)
}

/// The destination an explicit (unredirected) request names: its authority as `ip:port`.
fn explicit_target<B>(req: &Request<B>) -> Option<SocketAddr> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok().map(str::to_owned))?;
    authority
        .parse()
        .ok()
        .or_else(|| Some(SocketAddr::new(authority.parse().ok()?, 80)))
}

/// Serves HTTP from the application; `orig` is the redirected connection's
/// destination, or `None` for an explicit client (each request names its own).
async fn serve_http(proxy: Arc<Proxy>, stream: Downstream, orig: Option<SocketAddr>) -> anyhow::Result<()> {
    let resolution = orig.map(|o| proxy.discovery.subscribe(o));
    let svc_proxy = proxy.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let proxy = svc_proxy.clone();
        let fixed = resolution
            .as_ref()
            .map(|r| r.borrow().clone().unwrap_or(Resolution::Unknown));
        async move {
            let (orig, current) = match (orig, fixed) {
                (Some(orig), Some(current)) => (orig, current),
                _ => match explicit_target(&req) {
                    Some(dst) => (dst, proxy.discovery.resolve(dst).await),
                    None => {
                        return Ok(h::respond(
                            StatusCode::BAD_REQUEST,
                            "sidemesh: an unredirected request must name ip:port as its authority\n",
                        ));
                    }
                },
            };
            let started = Instant::now();
            let method = method_name(req.method());
            let span = proxy.telemetry.client_span(req.headers_mut(), method);
            let telemetry = &proxy.telemetry;
            let mut finish = Finish::new(Outcome::new(method), move |outcome: &Outcome, status| {
                telemetry.client_done(started, status, outcome, span);
            });
            let rsp = route(&proxy, orig, &current, req, finish.value_mut()).await;
            finish.done(rsp.status());
            Ok::<_, std::convert::Infallible>(rsp)
        }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    proxy.drain.serve(conn, |c| c.graceful_shutdown()).await
}

/// Why one attempt failed before a response arrived.
#[derive(Debug)]
enum AttemptError {
    /// Could not connect, or the connection failed mid-request.
    Connection(String),
    /// The per-attempt timeout passed.
    Timeout,
    /// The request cannot be sent at all.
    Malformed,
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connection(e) => write!(f, "connection: {e}"),
            Self::Timeout => f.write_str("per-attempt timeout"),
            Self::Malformed => f.write_str("malformed request"),
        }
    }
}

impl AttemptError {
    /// The status of [`AttemptError::response`].
    fn status(&self) -> StatusCode {
        match self {
            Self::Connection(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Malformed => StatusCode::BAD_REQUEST,
        }
    }

    fn response(&self) -> Response<Body> {
        match self {
            Self::Connection(_) => h::respond(StatusCode::BAD_GATEWAY, "sidemesh: cannot reach the endpoint\n"),
            Self::Timeout => h::respond(
                StatusCode::GATEWAY_TIMEOUT,
                "sidemesh: the endpoint did not answer in time\n",
            ),
            Self::Malformed => h::respond(StatusCode::BAD_REQUEST, "sidemesh: malformed request\n"),
        }
    }
}

/// Sends one request to `target` (over the mesh when it is meshed, with the
/// route's labels for the server proxy's metrics).
async fn send(
    proxy: &Proxy,
    target: &Target<'_>,
    orig: SocketAddr,
    mut req: Request<Body>,
    route_labels: Option<&HeaderValue>,
) -> Result<Response<Incoming>, AttemptError> {
    if crate::upgrade::requested(req.version(), req.headers()) {
        // Boxed: rare, and it should not grow every request's future.
        return Box::pin(send_upgrade(proxy, target, req, route_labels)).await;
    }
    match (&target.identity, &proxy.pool) {
        (Some(id), Some(pool)) => {
            h::to_mesh(&mut req, &orig.to_string()).map_err(|_| AttemptError::Malformed)?;
            if let Some(v) = route_labels {
                req.headers_mut().insert(h::ROUTE_LABELS, v.clone());
            }
            let mut sender = pool
                .get(target.addr, id)
                .await
                .map_err(|e| AttemptError::Connection(e.to_string()))?;
            sender
                .send_request(req)
                .await
                .map_err(|e| AttemptError::Connection(e.to_string()))
        }
        _ => {
            h::to_plain(&mut req, &target.addr.to_string()).map_err(|_| AttemptError::Malformed)?;
            proxy
                .plain
                .request(target.addr, req)
                .await
                .map_err(|e| AttemptError::Connection(e.to_string()))
        }
    }
}

/// Sends an upgrade request to `target` on a connection of its own (see
/// [`crate::upgrade`]).
async fn send_upgrade(
    proxy: &Proxy,
    target: &Target<'_>,
    mut req: Request<Body>,
    route_labels: Option<&HeaderValue>,
) -> Result<Response<Incoming>, AttemptError> {
    h::to_plain(&mut req, &target.addr.to_string()).map_err(|_| AttemptError::Malformed)?;
    crate::plain::origin_form(req.uri_mut());
    let failed = |e: &dyn std::fmt::Display| AttemptError::Connection(e.to_string());
    let guard = proxy.drain.guard();
    match (&target.identity, &proxy.pool) {
        (Some(id), Some(pool)) => {
            // The server proxy parses the request head (to add the client's
            // identity and count it) and delivers it as it would from HTTP/2.
            let headers = req.headers_mut();
            headers.insert(h::ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
            if let Some(v) = route_labels {
                headers.insert(h::ROUTE_LABELS, v.clone());
            }
            let io = crate::pool::connect_mesh(pool.tls(), target.addr, id, ALPN_HTTP1, &proxy.telemetry)
                .await
                .map_err(|e| failed(&e))?;
            crate::upgrade::send(io, req, guard).await
        }
        _ => {
            let io = crate::pool::connect_tcp(target.addr).await.map_err(|e| failed(&e))?;
            crate::upgrade::send(io, req, guard).await
        }
    }
    .map_err(|e| failed(&e))
}

/// Sends one request to an endpoint of its destination; what it learns on
/// the way (route, endpoint identity, mTLS) goes into `outcome`.
async fn route(
    proxy: &Proxy,
    orig: SocketAddr,
    resolution: &Resolution,
    mut req: Request<Incoming>,
    outcome: &mut Outcome,
) -> Response<Body> {
    // Only the inbound proxy may say who the client is, and only proxies label routes.
    req.headers_mut().remove(h::CLIENT_ID);
    req.headers_mut().remove(h::ROUTE_LABELS);
    let target = match resolution {
        Resolution::Service(policy) => return call_service(proxy, orig, policy, req, outcome).await,
        Resolution::Pod(ep) => {
            if proxy.telemetry.enabled() && ep.raw.meshed {
                outcome.workload = Some(ep.workload.clone());
            }
            match pod_target(ep, orig, proxy.pool.is_some()) {
                Some(target) => target,
                None => {
                    return h::respond(
                        StatusCode::BAD_GATEWAY,
                        "sidemesh: the destination Pod is meshed but its identity is unusable\n",
                    );
                }
            }
        }
        Resolution::Unknown => Target {
            addr: orig,
            identity: None,
        },
    };
    outcome.mtls = target.identity.is_some();
    let recorded = record_attempt(proxy, outcome, None);
    match send(proxy, &target, orig, req.map(Either::Left), None).await {
        Ok(rsp) => {
            recorded.done(rsp.status());
            rsp.map(Either::Left)
        }
        Err(e) => {
            tracing::debug!(addr = %target.addr, error = %e, "request failed");
            recorded.done(e.status());
            e.response()
        }
    }
}

/// Counts one attempt in `sidemesh.http.attempts` when it ends: with its
/// status, or, if it is dropped unfinished, with what cut it off: 504 once
/// the request's `deadline` has passed (`timeouts.request`), else 499 (the
/// client went away, as for the request itself).
fn record_attempt<'a>(
    proxy: &'a Proxy,
    outcome: &'a Outcome,
    deadline: Option<tokio::time::Instant>,
) -> Finish<Option<tokio::time::Instant>, impl FnOnce(&Option<tokio::time::Instant>, StatusCode) + 'a> {
    Finish::new(deadline, move |deadline, status| {
        let cut_by_timeout =
            status == crate::telemetry::client_closed() && deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        let status = if cut_by_timeout {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            status
        };
        proxy.telemetry.attempt(outcome, status.as_u16());
    })
}

/// A copy of a request head (method, URI, version, headers) for an attempt.
fn copy_head(parts: &http::request::Parts) -> Option<http::request::Parts> {
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(headers) = builder.headers_mut() {
        *headers = parts.headers.clone();
    }
    builder.body(()).ok().map(|r| r.into_parts().0)
}

/// Whether a request body may be held in memory for retries: known to be
/// small (Content-Length or an exact size hint) or empty.
fn bufferable(body: &Incoming) -> bool {
    use hyper::body::Body as _;
    body.is_end_stream() || body.size_hint().upper().is_some_and(|n| n <= MAX_RETRY_BODY as u64)
}

/// A Service request: route rule, backend split, endpoint choice, retries
/// within the budget, timeouts.
async fn call_service(
    proxy: &Proxy,
    orig: SocketAddr,
    policy: &ServicePolicy,
    req: Request<Incoming>,
    outcome: &mut Outcome,
) -> Response<Body> {
    let rule = policy.select(&req);
    let (key, labels) = match rule {
        Some(rule) => match split(&rule.backends) {
            Some(b) => (b.key.as_str(), &b.labels),
            // Gateway API: a rule whose backends all weigh 0 answers 500.
            None => {
                outcome.labels = rule.labels.clone();
                return h::respond(StatusCode::INTERNAL_SERVER_ERROR, "sidemesh: no backend has weight\n");
            }
        },
        None if policy.rules.is_empty() => (policy.default_key.as_str(), &policy.default_labels),
        None => {
            outcome.labels = policy.service_labels.clone();
            return h::respond(StatusCode::NOT_FOUND, "sidemesh: no route matches\n");
        }
    };
    outcome.labels = labels.clone();
    if policy.unresolved.contains(key) {
        return h::respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "sidemesh: the route's backend does not resolve\n",
        );
    }
    let endpoints = policy.endpoints(key);
    if endpoints.is_empty() {
        return h::respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "sidemesh: the backend has no endpoint\n",
        );
    }
    policy.budget.deposit();
    let deadline = rule
        .and_then(|r| r.request_timeout)
        .map(|limit| tokio::time::Instant::now() + limit);
    let attempts = attempts(proxy, orig, policy, rule, endpoints, req, outcome, deadline);
    match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline, attempts).await {
            Ok(rsp) => rsp,
            Err(_) => {
                proxy.telemetry.timeout(TimeoutKind::Request, labels);
                h::respond(StatusCode::GATEWAY_TIMEOUT, "sidemesh: request timeout\n")
            }
        },
        None => attempts.await,
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one request's context, passed once: a struct for it would be built and taken apart on the spot"
)]
async fn attempts(
    proxy: &Proxy,
    orig: SocketAddr,
    policy: &ServicePolicy,
    rule: Option<&Rule>,
    endpoints: &[Endpoint],
    req: Request<Incoming>,
    outcome: &mut Outcome,
    deadline: Option<tokio::time::Instant>,
) -> Response<Body> {
    // The route's labels travel with every attempt to the server proxy (when anything is recorded).
    let route_header: Option<HeaderValue> = proxy
        .telemetry
        .enabled()
        .then(|| outcome.labels.header().cloned())
        .flatten();
    let retry = rule.and_then(|r| r.retry.as_ref());
    let backend_timeout = rule.and_then(|r| r.backend_timeout);
    let (parts, body) = req.into_parts();
    // An upgrade is sent once: the downstream connection it takes over
    // travels with the original request head only.
    let upgrade = crate::upgrade::requested(parts.version, &parts.headers);
    let mut parts = Some(parts);
    // Retries need the body again: hold it when it is known to be small,
    // copy it as it streams when its length is unknown, else send it once.
    let (mut buffered, mut streaming, recorder): (Option<bytes::Bytes>, Option<Body>, _) = match retry {
        Some(_) if bufferable(&body) => match body.collect().await {
            Ok(b) => (Some(b.to_bytes()), None, None),
            Err(_) => return h::respond(StatusCode::BAD_REQUEST, "sidemesh: the request body broke off\n"),
        },
        Some(_) if !upgrade && hyper::body::Body::size_hint(&body).upper().is_none() => {
            let (recorder, body) = crate::replay::record(body);
            (None, Some(Either::Right(Either::Right(body))), Some(recorder))
        }
        _ => (None, Some(Either::Left(body)), None),
    };
    let max_attempts = match retry {
        Some(r) if !upgrade && (buffered.is_some() || recorder.is_some()) => r.attempts,
        _ => 1,
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt = 1;
    loop {
        let Some(pick) = proxy.balancer.pick(endpoints, &tried) else {
            return h::respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "sidemesh: the backend has no endpoint\n",
            );
        };
        tried.push(pick.addr);
        outcome.workload = Some(endpoints[pick.index].workload.clone());
        let Some(target) = endpoint_target(proxy, &endpoints[pick.index]) else {
            proxy.balancer.done(pick, false);
            return h::respond(StatusCode::BAD_GATEWAY, "sidemesh: endpoint address unusable\n");
        };
        let body: Body = match (&buffered, streaming.take()) {
            (Some(bytes), _) => h::full(bytes.clone()),
            (None, Some(body)) => body,
            (None, None) => {
                return h::respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "sidemesh: request body already sent\n",
                );
            }
        };
        // The last possible attempt takes the request head as it came; an
        // attempt that may be retried sends a copy.
        let head = if attempt >= max_attempts {
            parts.take()
        } else {
            parts.as_ref().and_then(copy_head)
        };
        let Some(mut head) = head else {
            proxy.balancer.done(pick, true);
            return h::respond(StatusCode::BAD_REQUEST, "sidemesh: malformed request\n");
        };
        if attempt > 1 {
            head.headers
                .insert(h::RETRY_ATTEMPT, http::HeaderValue::from(attempt - 1));
        }
        let req = Request::from_parts(head, body);
        outcome.mtls = target.identity.is_some();
        let recorded = record_attempt(proxy, outcome, deadline);
        let sent = send(proxy, &target, orig, req, route_header.as_ref());
        let result = match backend_timeout {
            Some(limit) => tokio::time::timeout(limit, sent)
                .await
                .unwrap_or(Err(AttemptError::Timeout)),
            None => sent.await,
        };
        let (response, retryable) = match result {
            Ok(rsp) => {
                let code = rsp.status().as_u16();
                if proxy.balancer.done(pick, code < 500) {
                    proxy.telemetry.ejection(&outcome.labels);
                }
                recorded.done(rsp.status());
                let retryable = retry.is_some_and(|r| r.codes.contains(&code));
                (rsp.map(Either::Left), retryable)
            }
            Err(e) => {
                if proxy.balancer.done(pick, false) {
                    proxy.telemetry.ejection(&outcome.labels);
                }
                if matches!(e, AttemptError::Timeout) {
                    proxy.telemetry.timeout(TimeoutKind::BackendRequest, &outcome.labels);
                }
                recorded.done(e.status());
                tracing::debug!(addr = %target.addr, error = %e, attempt, "attempt failed");
                let retryable = match &e {
                    AttemptError::Connection(_) => true,
                    AttemptError::Timeout => retry.is_some_and(|r| r.codes.contains(&504)),
                    AttemptError::Malformed => false,
                };
                (e.response(), retryable)
            }
        };
        if !retryable || attempt >= max_attempts {
            return response;
        }
        // A streamed body is replayed only if the first attempt read all of it.
        if buffered.is_none() {
            match recorder.as_ref().and_then(crate::replay::Recorder::replay) {
                Some(bytes) => buffered = Some(bytes),
                None => {
                    tracing::debug!(
                        attempt,
                        "not retried: the request body was not read whole, or exceeds 64 KiB"
                    );
                    return response;
                }
            }
        }
        // When the budget is spent the original failure is returned.
        if !policy.budget.withdraw() {
            tracing::debug!(service = %policy.default_key, "retry budget exhausted");
            proxy.telemetry.budget_exhausted(&outcome.labels);
            return response;
        }
        proxy.telemetry.retry(&outcome.labels);
        drop(response);
        if let Some(r) = retry {
            tokio::time::sleep(crate::retry::backoff(r.backoff, attempt + 1)).await;
        }
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidemesh_proto::destination::v1 as pb;

    fn pod(address: &str, identity: &str, meshed: bool) -> Endpoint {
        Endpoint::from(pb::Endpoint {
            address: address.into(),
            port: 8080,
            identity: identity.into(),
            meshed,
            ready: true,
            ..Default::default()
        })
    }

    #[test]
    fn a_meshed_pod_gets_mtls_or_nothing_never_plaintext() {
        let orig: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let good = pod("10.1.2.3", id, true);
        let t = pod_target(&good, orig, true).expect("target");
        assert_eq!(
            (t.addr, t.identity.map(ToString::to_string)),
            (orig, Some(id.to_owned()))
        );
        // Unparseable identity: refused rather than sent in the clear.
        assert!(pod_target(&pod("10.1.2.3", "spiffe://x", true), orig, true).is_none());
        // A good identity survives an unparseable address (the original destination is the Pod).
        let bad_addr = pod("10.1.2.300", id, true);
        let t = pod_target(&bad_addr, orig, true).expect("target");
        assert_eq!((t.addr, t.identity.is_some()), (orig, true));
        // Unmeshed Pods, and proxies without mesh TLS, send plain.
        let plain = pod("10.1.2.3", "", false);
        let t = pod_target(&plain, orig, true).expect("target");
        assert!(t.identity.is_none());
        assert!(pod_target(&good, orig, false).expect("target").identity.is_none());
    }
}
