//! Upstream connections. Between proxies: one pooled mTLS HTTP/2 connection
//! per peer endpoint carries every HTTP request to it, and each opaque TCP
//! stream gets its own mTLS connection (resumed, thanks to the per-identity
//! client configs in [`crate::tls::MeshTls`]). Plain HTTP to the local
//! application and to unmeshed upstreams is [`crate::plain`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2;
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

/// Runs a client connection (hyper's connection future) on its own task
/// until it ends; how it ended is logged at debug level.
pub(crate) fn drive<F>(addr: SocketAddr, what: &'static str, conn: F)
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "{what} connection ended");
        }
    });
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

/// One peer endpoint's pooled connection.
#[derive(Debug)]
struct Slot {
    /// The identity the connection was made to verify.
    peer: SpiffeId,
    sender: Option<http2::SendRequest<Body>>,
    /// Held while connecting, so one caller connects and the others wait for it.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// Whether a request took the connection since [`MeshPool::close_idle`] last ran.
    used: bool,
}

impl Slot {
    fn ready(&mut self, peer: &SpiffeId) -> Option<http2::SendRequest<Body>> {
        if &self.peer != peer {
            return None;
        }
        let sender = self.sender.as_ref().filter(|s| s.is_ready()).cloned();
        self.used |= sender.is_some();
        sender
    }

    fn connecting(&self) -> bool {
        Arc::strong_count(&self.connecting) > 1
    }
}

/// Slots kept before the first sweep of dead ones.
const SWEEP_FROM: usize = 64;

/// Forgets slots with no live connection that nobody is connecting or
/// waiting on. Without this the pool would keep a slot for every peer
/// endpoint it ever met, and Pods come and go with new addresses.
fn sweep(slots: &mut HashMap<SocketAddr, Slot>) {
    slots.retain(|_, slot| slot.connecting() || slot.sender.as_ref().is_some_and(|s| !s.is_closed()));
}

/// Forgets the slots no request used since the last call (closing their
/// connections) but not one being connected.
fn close_unused(slots: &mut HashMap<SocketAddr, Slot>) {
    slots.retain(|addr, slot| {
        if slot.connecting() || std::mem::take(&mut slot.used) {
            return true;
        }
        if slot.sender.take().is_some_and(|s| !s.is_closed()) {
            tracing::debug!(%addr, peer = %slot.peer, "closing an idle mesh connection");
        }
        false
    });
}

/// Pooled HTTP/2-over-mTLS connections to peer proxies, one per endpoint.
#[derive(Debug)]
pub struct MeshPool {
    tls: Arc<MeshTls>,
    slots: Mutex<HashMap<SocketAddr, Slot>>,
    /// Sweep when a new slot would make this many: twice what the last sweep
    /// left, so sweeping costs O(1) per new slot.
    sweep_at: AtomicUsize,
    telemetry: Arc<ProxyTelemetry>,
}

impl MeshPool {
    /// An empty pool; handshakes are counted in `telemetry`.
    pub fn new(tls: Arc<MeshTls>, telemetry: Arc<ProxyTelemetry>) -> Self {
        Self {
            tls,
            slots: Mutex::default(),
            sweep_at: AtomicUsize::new(SWEEP_FROM),
            telemetry,
        }
    }

    /// The mesh TLS configurations.
    pub fn tls(&self) -> &Arc<MeshTls> {
        &self.tls
    }

    fn ready(&self, addr: SocketAddr, peer: &SpiffeId) -> Option<http2::SendRequest<Body>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get_mut(&addr)?.ready(peer)
    }

    /// Closes the connections no request took since the last call, and
    /// forgets dead slots. Called
    /// every idle timeout, so a connection goes after one to two of them
    /// unused: a peer that left discovery but lives on (scaled out of its
    /// Service, relabelled, not ready) is not held open for ever by the
    /// HTTP/2 keep-alive pings. Dropping the pool's sender lets hyper end
    /// the connection (GOAWAY) once its last in-flight request is done.
    pub fn close_idle(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        close_unused(&mut slots);
        self.sweep_at.store((2 * slots.len()).max(SWEEP_FROM), Relaxed);
    }

    /// A ready sender to `addr`, connecting (once, whoever asks first) if needed.
    pub async fn get(&self, addr: SocketAddr, peer: &SpiffeId) -> Result<http2::SendRequest<Body>, ConnectError> {
        match self.ready(addr, peer) {
            Some(sender) => Ok(sender),
            // Boxed: the connect and handshake futures are kilobytes that
            // every request's future would otherwise carry (and copy).
            None => Box::pin(self.connect(addr, peer)).await,
        }
    }

    async fn connect(&self, addr: SocketAddr, peer: &SpiffeId) -> Result<http2::SendRequest<Body>, ConnectError> {
        let gate = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            if !slots.contains_key(&addr) && slots.len() + 1 >= self.sweep_at.load(Relaxed) {
                sweep(&mut slots);
                self.sweep_at.store((2 * slots.len()).max(SWEEP_FROM), Relaxed);
            }
            let slot = slots.entry(addr).or_insert_with(|| Slot {
                peer: peer.clone(),
                sender: None,
                connecting: Arc::default(),
                used: true,
            });
            if &slot.peer != peer {
                // The endpoint's identity changed: its old connection is not for this peer.
                slot.peer = peer.clone();
                slot.sender = None;
            }
            slot.connecting.clone()
        };
        let _connecting = gate.lock().await;
        if let Some(sender) = self.ready(addr, peer) {
            return Ok(sender);
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
        drive(addr, "mesh HTTP/2", conn);
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get_mut(&addr)
            && &slot.peer == peer
        {
            slot.sender = Some(sender.clone());
            slot.used = true;
        }
        Ok(sender)
    }

    /// Peer endpoints the pool holds a slot for (live ones, and dead ones
    /// not yet swept).
    pub fn len(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether the pool holds no slot.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_slot() -> Slot {
        Slot {
            peer: SpiffeId::new("cluster.local", "shop", "web").expect("id"),
            sender: None,
            connecting: Arc::default(),
            used: false,
        }
    }

    #[test]
    fn sweeping_forgets_dead_slots_but_not_one_being_connected() {
        let mut slots: HashMap<SocketAddr, Slot> = (1..=100u16)
            .map(|port| (SocketAddr::from(([10, 0, 0, 1], port)), dead_slot()))
            .collect();
        let busy: SocketAddr = "10.0.0.1:7".parse().expect("addr");
        // Someone is connecting to this one (holds the gate's Arc).
        let _gate = slots[&busy].connecting.clone();
        sweep(&mut slots);
        assert_eq!(slots.keys().copied().collect::<Vec<_>>(), vec![busy]);
    }

    #[test]
    fn an_idle_slot_goes_at_the_second_call_and_a_used_one_stays() {
        let addr = |port| SocketAddr::from(([10, 0, 0, 1], port));
        let mut slots: HashMap<SocketAddr, Slot> = (1..=3).map(|port| (addr(port), dead_slot())).collect();
        let _gate = slots[&addr(3)].connecting.clone();
        slots.get_mut(&addr(2)).expect("slot").used = true;
        close_unused(&mut slots);
        let mut left: Vec<_> = slots.keys().copied().collect();
        left.sort();
        assert_eq!(left, vec![addr(2), addr(3)], "the used one had its round");
        close_unused(&mut slots);
        assert_eq!(slots.keys().copied().collect::<Vec<_>>(), vec![addr(3)], "unused since");
    }
}
