//! The inbound side: connections to the Pod, redirected to the inbound port
//! by iptables. A mesh peer's mTLS is terminated (its identity checked and
//! kept), then its HTTP requests or its opaque stream are delivered to the
//! application at `SIDEMESH_APP_ADDR` on the original port. Plaintext and an
//! application's own TLS pass through in `permissive` mode and are refused
//! in `strict` mode.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::Proxy;
use crate::config::InboundPolicy;
use crate::detect::{self, Detected, Protocol};
use crate::http::{self as h, Body};
use crate::telemetry::{self, Counted, Direction, Finish, InboundConn, RouteLabels, method_name};
use crate::tls::{ALPN_HTTP, ALPN_HTTP1, ALPN_TCP};

/// The peer's side of a connection, its bytes counted.
type Downstream = Counted<TcpStream>;

/// Whether a peeked ClientHello offers a sidemesh ALPN (a peer proxy), as
/// opposed to the application's own TLS.
async fn is_mesh_hello(stream: &TcpStream, proxy: &Proxy) -> bool {
    let deadline = tokio::time::Instant::now() + proxy.detect_timeout;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        if acceptor.read_tls(&mut rd).is_err() {
            return false;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return accepted
                    .client_hello()
                    .alpn()
                    .is_some_and(|mut alpn| alpn.any(|p| [ALPN_HTTP, ALPN_HTTP1, ALPN_TCP].contains(&p)));
            }
            Ok(None) if n < buf.len() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            _ => return false,
        }
    }
}

/// Handles one connection accepted on the inbound listener.
pub async fn handle(proxy: Arc<Proxy>, stream: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
    let proxy = &proxy;
    let _ = stream.set_nodelay(true);
    let orig = crate::socket::original_dst(&stream)?;
    // Without iptables (a fixed application port) connections arrive unredirected.
    if orig == stream.local_addr()? && proxy.app_port.is_none() {
        anyhow::bail!("connection to {orig} was not redirected to the proxy; refusing to loop");
    }
    let app = SocketAddr::new(proxy.app_ip, proxy.app_port.unwrap_or(orig.port()));
    let protocol = if proxy.opaque_ports.contains(&orig.port()) && proxy.pool.is_none() {
        Protocol::Opaque
    } else {
        let detected = if proxy.inbound_policy == InboundPolicy::Strict {
            // Mesh peers speak at once, and strict refuses everyone else.
            let said = detect::detect(&stream, proxy.detect_timeout).await?;
            Detected::Client(said.unwrap_or(Protocol::Opaque))
        } else {
            detect::detect_or_connect(&stream, proxy.detect_timeout, || crate::pool::connect_tcp(app)).await?
        };
        match detected {
            Detected::Client(p) => {
                proxy.telemetry.detected(Direction::Inbound, p);
                p
            }
            Detected::Server { mut upstream, greeting } => {
                tracing::debug!(%peer, %app, "inbound server-first (unauthenticated)");
                proxy.telemetry.detected(Direction::Inbound, Protocol::Opaque);
                let mut stream = proxy.telemetry.counted(stream, Direction::Inbound);
                crate::relay::relay_greeted(&mut stream, &mut upstream, &greeting).await?;
                return Ok(());
            }
            Detected::Closed => return Ok(()),
        }
    };
    let mesh = match (&protocol, &proxy.pool) {
        (Protocol::Tls, Some(_)) => is_mesh_hello(&stream, proxy).await,
        _ => false,
    };
    let stream = proxy.telemetry.counted(stream, Direction::Inbound);
    if mesh {
        return serve_mesh(proxy, stream, peer, app).await;
    }
    if proxy.inbound_policy == InboundPolicy::Strict {
        anyhow::bail!("strict inbound policy: refusing {protocol:?} from {peer} (not mesh mTLS)");
    }
    // Permissive: as without the mesh, marked unauthenticated. HTTP is still
    // proxied request by request so that nobody can forge the client-id header.
    tracing::debug!(%peer, %app, ?protocol, "inbound plaintext (unauthenticated)");
    if matches!(protocol, Protocol::Http1 | Protocol::Http2) {
        return serve_plain_http(proxy, stream, app).await;
    }
    let mut upstream = crate::pool::connect_tcp(app).await?;
    let mut stream = stream;
    crate::relay::relay(&mut stream, &mut upstream).await?;
    Ok(())
}

async fn serve_plain_http(proxy: &Arc<Proxy>, stream: Downstream, app: SocketAddr) -> anyhow::Result<()> {
    let svc_proxy = proxy.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let proxy = svc_proxy.clone();
        async move {
            let started = Instant::now();
            let method = method_name(req.method());
            // Nobody vouches for a plaintext peer: no identity, no route labels.
            req.headers_mut().remove(h::CLIENT_ID);
            req.headers_mut().remove(h::ROUTE_LABELS);
            let span = proxy.telemetry.server_span(req.headers_mut(), method);
            let none = RouteLabels::none();
            let telemetry = &proxy.telemetry;
            let finish = Finish::new((), move |_: &(), status| {
                telemetry.server_done(started, method, status, None, &none, span);
            });
            let rsp = match h::to_plain(&mut req, &app.to_string()) {
                Ok(()) if crate::upgrade::requested(req.version(), req.headers()) => {
                    Box::pin(upgrade_to_app(&proxy, app, req)).await
                }
                Ok(()) => match proxy.plain.request(app, req.map(Either::Left)).await {
                    Ok(rsp) => rsp.map(Either::Left),
                    Err(e) => {
                        tracing::debug!(%app, error = %e, "application request failed");
                        h::respond(StatusCode::BAD_GATEWAY, "sidemesh: the application did not answer\n")
                    }
                },
                Err(_) => h::respond(StatusCode::BAD_REQUEST, "sidemesh: malformed request\n"),
            };
            finish.done(rsp.status());
            Ok::<_, std::convert::Infallible>(rsp)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    proxy.drain.serve(conn, |c| c.graceful_shutdown()).await
}

/// A plaintext upgrade request, sent to the application on a connection of its own.
async fn upgrade_to_app(proxy: &Proxy, app: SocketAddr, mut req: Request<Incoming>) -> Response<Body> {
    crate::plain::origin_form(req.uri_mut());
    let sent = match crate::pool::connect_tcp(app).await {
        Ok(io) => crate::upgrade::send(io, req.map(Either::Left), proxy.drain.guard())
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match sent {
        Ok(rsp) => rsp.map(Either::Left),
        Err(e) => {
            tracing::debug!(%app, error = %e, "application upgrade request failed");
            h::respond(StatusCode::BAD_GATEWAY, "sidemesh: the application did not answer\n")
        }
    }
}

async fn serve_mesh(proxy: &Arc<Proxy>, stream: Downstream, peer: SocketAddr, app: SocketAddr) -> anyhow::Result<()> {
    let Some(pool) = &proxy.pool else {
        anyhow::bail!("no mesh identity");
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(pool.tls().server()?);
    let accepted = tokio::time::timeout(crate::pool::CONNECT_TIMEOUT, acceptor.accept(stream)).await;
    proxy
        .telemetry
        .handshake(Direction::Inbound, matches!(accepted, Ok(Ok(_))));
    let mut tls = accepted.map_err(|_| anyhow::anyhow!("mTLS handshake from {peer} timed out"))??;
    let (_, conn) = tls.get_ref();
    let client_id = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| sidemesh_identity_client::verify::peer_id(c).ok());
    let Some(client_id) = client_id else {
        anyhow::bail!("mTLS peer {peer} presented no mesh identity");
    };
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    tracing::debug!(%peer, %app, client = %client_id, "inbound mTLS");
    if alpn.as_deref() == Some(ALPN_TCP) {
        let mut upstream = crate::pool::connect_tcp(app).await?;
        crate::relay::relay(&mut tls, &mut upstream).await?;
        return Ok(());
    }
    let svc_proxy = proxy.clone();
    let conn = Arc::new(InboundConn::new(
        proxy
            .telemetry
            .enabled()
            .then(|| telemetry::workload("source_workload", &client_id.to_string())),
    ));
    // The header the application reads the client from, made once per connection.
    let client_id: Option<Arc<HeaderValue>> = HeaderValue::from_str(&client_id.to_string()).ok().map(Arc::new);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let proxy = svc_proxy.clone();
        let client_id = client_id.clone();
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(to_app(&proxy, app, client_id.as_deref(), &conn, req).await) }
    });
    if alpn.as_deref() == Some(ALPN_HTTP1) {
        // One upgrade request (WebSocket), then its relay: see `crate::upgrade`.
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(crate::pool::CONNECT_TIMEOUT)
            .serve_connection(TokioIo::new(tls), svc)
            .with_upgrades();
        return proxy.drain.serve(conn, |c| c.graceful_shutdown()).await;
    }
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .adaptive_window(true)
        .max_concurrent_streams(10_000)
        .serve_connection(TokioIo::new(tls), svc);
    proxy.drain.serve(conn, |c| c.graceful_shutdown()).await
}

/// A request from a peer proxy, delivered to the application and measured.
async fn to_app(
    proxy: &Proxy,
    app: SocketAddr,
    client_id: Option<&HeaderValue>,
    conn: &InboundConn,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let method = method_name(req.method());
    let labels = match req.headers_mut().remove(h::ROUTE_LABELS) {
        Some(v) if proxy.telemetry.enabled() => conn.labels(Some(v)),
        _ => RouteLabels::none(),
    };
    let span = proxy.telemetry.server_span(req.headers_mut(), method);
    let finish = Finish::new((), |_: &(), status| {
        proxy
            .telemetry
            .server_done(started, method, status, conn.source.as_ref(), &labels, span);
    });
    let rsp = deliver(proxy, app, client_id, req).await;
    finish.done(rsp.status());
    rsp
}

async fn deliver(
    proxy: &Proxy,
    app: SocketAddr,
    client_id: Option<&HeaderValue>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if let Err(e) = h::to_app(&mut req, &app.to_string()) {
        tracing::debug!(error = %e, "malformed request from a peer proxy");
        return h::respond(StatusCode::BAD_REQUEST, "sidemesh: malformed request\n");
    }
    if let Some(v) = client_id {
        req.headers_mut().insert(h::CLIENT_ID, v.clone());
    }
    if crate::upgrade::requested(req.version(), req.headers()) {
        // Only on a `sidemesh.http1` connection: HTTP/2 has no upgrades.
        return Box::pin(upgrade_to_app(proxy, app, req)).await;
    }
    match proxy.plain.request(app, req.map(Either::Left)).await {
        Ok(rsp) => rsp.map(Either::Left),
        Err(e) => {
            tracing::debug!(%app, error = %e, "application request failed");
            h::respond(StatusCode::BAD_GATEWAY, "sidemesh: the application did not answer\n")
        }
    }
}
