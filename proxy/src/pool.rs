//! Upstream connections. Between proxies: one pooled mTLS HTTP/2 connection
//! per peer endpoint carries every HTTP request to it, and each opaque TCP
//! stream gets its own mTLS connection (resumed, thanks to the per-identity
//! client configs in [`crate::tls::MeshTls`]). To unmeshed upstreams and to
//! the local application: plain pooled HTTP/1 and HTTP/2 clients.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use sidemesh_identity_client::SpiffeId;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::http::Body;
use crate::telemetry::{Direction, ProxyTelemetry};
use crate::tls::{ALPN_HTTP, ALPN_TCP, MeshTls};

/// Bound on establishing a TCP connection upstream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed or timed out.
    #[error("connecting to {addr}: {reason}")]
    Tcp {
        /// Upstream.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// The mTLS handshake failed (wrong identity, untrusted chain, …).
    #[error("mTLS to {addr} ({peer}): {reason}")]
    Tls {
        /// Upstream.
        addr: SocketAddr,
        /// Expected identity.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 to {addr}: {source}")]
    Http2 {
        /// Upstream.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: hyper::Error,
    },
}

/// Opens a TCP connection with a bounded wait.
pub async fn connect_tcp(addr: SocketAddr) -> Result<TcpStream, ConnectError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Tcp {
            addr,
            reason: "timed out".into(),
        })?
        .map_err(|e| ConnectError::Tcp {
            addr,
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// An mTLS connection to a peer proxy that must present `peer`; the
/// handshake's result is counted in `telemetry`.
pub async fn connect_mesh(
    tls: &MeshTls,
    addr: SocketAddr,
    peer: &SpiffeId,
    alpn: &'static [u8],
    telemetry: &ProxyTelemetry,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let tls_err = |reason: String| ConnectError::Tls {
        addr,
        peer: peer.to_string(),
        reason,
    };
    let config = tls.client(peer, alpn).map_err(|e| tls_err(e.to_string()))?;
    let tcp = connect_tcp(addr).await?;
    let handshake = async {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(config).connect(ServerName::IpAddress(addr.ip().into()), tcp),
        )
        .await
        .map_err(|_| tls_err("handshake timed out".into()))?
        .map_err(|e| tls_err(e.to_string()))?;
        if stream.get_ref().1.alpn_protocol() != Some(alpn) {
            return Err(tls_err("the peer is not a sidemesh proxy (no ALPN agreement)".into()));
        }
        Ok(stream)
    };
    let result = handshake.await;
    telemetry.handshake(Direction::Outbound, result.is_ok());
    result
}

/// An opaque stream to a peer proxy.
pub async fn connect_mesh_tcp(
    tls: &MeshTls,
    addr: SocketAddr,
    peer: &SpiffeId,
    telemetry: &ProxyTelemetry,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    connect_mesh(tls, addr, peer, ALPN_TCP, telemetry).await
}

type Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

/// Pooled HTTP/2-over-mTLS connections to peer proxies, one per endpoint.
#[derive(Debug)]
pub struct MeshPool {
    tls: Arc<MeshTls>,
    slots: Mutex<HashMap<(SocketAddr, SpiffeId), Slot>>,
    telemetry: Arc<ProxyTelemetry>,
}

impl MeshPool {
    /// An empty pool; handshakes are counted in `telemetry`.
    pub fn new(tls: Arc<MeshTls>, telemetry: Arc<ProxyTelemetry>) -> Self {
        Self {
            tls,
            slots: Mutex::default(),
            telemetry,
        }
    }

    /// The mesh TLS configurations.
    pub fn tls(&self) -> &Arc<MeshTls> {
        &self.tls
    }

    /// A ready sender to `addr`, connecting (once, whoever asks first) if needed.
    pub async fn get(&self, addr: SocketAddr, peer: &SpiffeId) -> Result<http2::SendRequest<Body>, ConnectError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry((addr, peer.clone())).or_default().clone()
        };
        let mut held = slot.lock().await;
        if let Some(sender) = held.as_ref()
            && !sender.is_closed()
        {
            let mut sender = sender.clone();
            drop(held);
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
            held = slot.lock().await;
        }
        let stream = connect_mesh(&self.tls, addr, peer, ALPN_HTTP, &self.telemetry).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .adaptive_window(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ConnectError::Http2 { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "mesh connection ended");
            }
        });
        *held = Some(sender.clone());
        Ok(sender)
    }

    /// Drops connections to endpoints no longer in use would go here; for now
    /// the pool keeps one slot per endpoint ever used.
    pub fn len(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether the pool holds no slot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Plain (unmeshed) HTTP clients, pooled per authority.
#[derive(Clone, Debug)]
pub struct PlainClients {
    /// HTTP/1.1.
    pub http1: Client<HttpConnector, Body>,
    /// HTTP/2 with prior knowledge.
    pub http2: Client<HttpConnector, Body>,
}

impl Default for PlainClients {
    fn default() -> Self {
        Self::new()
    }
}

impl PlainClients {
    /// New clients.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.enforce_http(true);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .build(connector);
        Self { http1, http2 }
    }

    /// The client for a request of `version`.
    pub fn for_version(&self, version: http::Version) -> &Client<HttpConnector, Body> {
        if version == http::Version::HTTP_2 {
            &self.http2
        } else {
            &self.http1
        }
    }
}
