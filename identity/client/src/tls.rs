//! rustls configurations for mesh connections that follow certificate and
//! bundle changes without being rebuilt: the certificate is resolved and the
//! peer verified at each handshake.

use std::sync::Arc;

use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::manager::WorkloadCert;

/// ALPN id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// Resolves to the current workload certificate, on both sides of a handshake.
#[derive(Debug, Clone)]
pub struct CurrentCert {
    rx: watch::Receiver<Option<Arc<WorkloadCert>>>,
}

impl CurrentCert {
    /// Follows the certificates published on `rx`.
    pub fn new(rx: watch::Receiver<Option<Arc<WorkloadCert>>>) -> Self {
        Self { rx }
    }

    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.rx.borrow().as_ref().map(|c| c.certified_key.clone())
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        self.rx.borrow().is_some()
    }
}

/// How long a client may take over its TLS handshake with [`incoming`].
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The TLS connections handshaken on `listener`, for a gRPC server's
/// `serve_with_incoming`: each handshake runs on its own task (bounded by
/// [`HANDSHAKE_TIMEOUT`]), so a client that stalls or sends garbage holds up
/// nobody; failures are logged at debug and dropped. Accepting stops once
/// `stop` is true (or its sender is gone).
pub fn incoming(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) -> tokio::sync::mpsc::Receiver<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                // The borrow `wait_for` returns is not Send: drop it at once.
                _ = async { drop(stop.wait_for(|s| *s).await) } => return,
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept");
                        // Out of file descriptors and the like: do not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let conn_tx = conn_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = conn_tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    conn_rx
}
