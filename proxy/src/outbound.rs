//! The outbound side: connections from the application, redirected to the
//! outbound port by iptables. The original destination is looked up in
//! discovery; HTTP is proxied request by request (to a meshed endpoint over
//! the pooled mTLS HTTP/2 connection, else plainly), everything else is
//! copied as TCP (over its own mTLS stream to a meshed endpoint). Unknown
//! destinations get exactly what they would have got without the mesh.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sidemesh_identity_client::SpiffeId;
use sidemesh_proto::destination::v1 as pb;
use tokio::net::{TcpListener, TcpStream};

use crate::Proxy;
use crate::detect::{self, Protocol};
use crate::discovery::Resolution;
use crate::http::{self as h, Body};

/// Accepts on the outbound listener until draining starts.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = proxy.drain.signaled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "outbound accept");
                continue;
            }
        };
        let proxy = proxy.clone();
        let guard = proxy.drain.guard();
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = handle(&proxy, stream, peer).await {
                tracing::debug!(%peer, error = %e, "outbound connection");
            }
        });
    }
}

/// An endpoint to send to.
#[derive(Debug, Clone)]
struct Target {
    addr: SocketAddr,
    /// Set when the endpoint is meshed and we hold mesh TLS.
    identity: Option<SpiffeId>,
}

fn endpoint_target(proxy: &Proxy, ep: &pb::Endpoint) -> Option<Target> {
    let ip = ep.address.parse().ok()?;
    let port = u16::try_from(ep.port).ok()?;
    let identity = (ep.meshed && proxy.pool.is_some())
        .then(|| ep.identity.parse::<SpiffeId>().ok())
        .flatten();
    Some(Target {
        addr: SocketAddr::new(ip, port),
        identity,
    })
}

/// Picks an endpoint of the resolution; `None` for a service with none.
fn pick(proxy: &Proxy, orig: SocketAddr, resolution: &Resolution) -> Option<Target> {
    match resolution {
        Resolution::Unknown => Some(Target {
            addr: orig,
            identity: None,
        }),
        Resolution::Pod(ep) => endpoint_target(proxy, ep).or(Some(Target {
            addr: orig,
            identity: None,
        })),
        Resolution::Service(svc) => {
            let eps: Vec<&pb::Endpoint> = svc
                .default_backend
                .as_ref()
                .map(|b| b.endpoints.iter().filter(|e| e.ready).collect())
                .unwrap_or_default();
            if eps.is_empty() {
                return None;
            }
            let i = rand::random_range(0..eps.len());
            endpoint_target(proxy, eps[i])
        }
    }
}

fn is_opaque(proxy: &Proxy, orig: SocketAddr, resolution: &Resolution) -> bool {
    proxy.opaque_ports.contains(&orig.port())
        || matches!(resolution, Resolution::Service(s) if s.opaque)
        || matches!(resolution, Resolution::Unknown)
}

async fn handle(proxy: &Arc<Proxy>, stream: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    let orig = crate::socket::original_dst(&stream)?;
    if orig == stream.local_addr()? {
        anyhow::bail!("connection to {orig} was not redirected to the proxy; refusing to loop");
    }
    let resolution = proxy.discovery.resolve(orig).await;
    // Unknown destinations and opaque ports are never inspected: no waiting
    // for a client that expects the server to speak first.
    let protocol = if is_opaque(proxy, orig, &resolution) {
        Protocol::Opaque
    } else {
        detect::detect(&stream, proxy.detect_timeout).await?
    };
    tracing::debug!(%peer, %orig, ?protocol, "outbound");
    match protocol {
        Protocol::Http1 | Protocol::Http2 => serve_http(proxy.clone(), stream, orig).await,
        Protocol::Opaque | Protocol::Tls => forward_tcp(proxy, stream, orig, &resolution).await,
    }
}

async fn forward_tcp(
    proxy: &Proxy,
    mut stream: TcpStream,
    orig: SocketAddr,
    resolution: &Resolution,
) -> anyhow::Result<()> {
    let Some(target) = pick(proxy, orig, resolution) else {
        anyhow::bail!("{orig}: service has no ready endpoint");
    };
    match (&target.identity, &proxy.pool) {
        (Some(id), Some(pool)) => {
            let mut upstream = crate::pool::connect_mesh_tcp(pool.tls(), target.addr, id).await?;
            tokio::io::copy_bidirectional(&mut stream, &mut upstream).await?;
        }
        _ => {
            let mut upstream = crate::pool::connect_tcp(target.addr).await?;
            tokio::io::copy_bidirectional(&mut stream, &mut upstream).await?;
        }
    }
    Ok(())
}

async fn serve_http(proxy: Arc<Proxy>, stream: TcpStream, orig: SocketAddr) -> anyhow::Result<()> {
    let resolution = proxy.discovery.subscribe(orig);
    let svc_proxy = proxy.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let proxy = svc_proxy.clone();
        let current = resolution.borrow().clone().unwrap_or(Resolution::Unknown);
        async move { Ok::<_, std::convert::Infallible>(route(&proxy, orig, &current, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r.map_err(|e| anyhow::anyhow!("{e}"))?,
        _ = proxy.drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    Ok(())
}

/// Sends one request to an endpoint of its destination.
async fn route(proxy: &Proxy, orig: SocketAddr, resolution: &Resolution, mut req: Request<Incoming>) -> Response<Body> {
    // Only the inbound proxy may say who the client is.
    req.headers_mut().remove(h::CLIENT_ID);
    let Some(target) = pick(proxy, orig, resolution) else {
        return h::respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "sidemesh: the service has no ready endpoint\n",
        );
    };
    match (&target.identity, &proxy.pool) {
        (Some(id), Some(pool)) => {
            if let Err(e) = h::to_mesh(&mut req, &orig.to_string()) {
                tracing::debug!(error = %e, "request cannot be carried over HTTP/2");
                return h::respond(StatusCode::BAD_REQUEST, "sidemesh: malformed request\n");
            }
            let mut sender = match pool.get(target.addr, id).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh connection");
                    return h::respond(StatusCode::BAD_GATEWAY, "sidemesh: cannot reach the endpoint\n");
                }
            };
            match sender.send_request(req).await {
                Ok(rsp) => rsp.map(Either::Left),
                Err(e) => {
                    tracing::debug!(addr = %target.addr, error = %e, "mesh request failed");
                    h::respond(StatusCode::BAD_GATEWAY, "sidemesh: the endpoint failed the request\n")
                }
            }
        }
        _ => {
            if let Err(e) = h::to_plain(&mut req, &target.addr.to_string()) {
                tracing::debug!(error = %e, "malformed request");
                return h::respond(StatusCode::BAD_REQUEST, "sidemesh: malformed request\n");
            }
            let client = proxy.plain.for_version(req.version());
            match client.request(req).await {
                Ok(rsp) => rsp.map(Either::Left),
                Err(e) => {
                    tracing::debug!(addr = %target.addr, error = %e, "plain request failed");
                    h::respond(StatusCode::BAD_GATEWAY, "sidemesh: cannot reach the endpoint\n")
                }
            }
        }
    }
}
