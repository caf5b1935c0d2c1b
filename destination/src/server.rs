//! Serving discovery over mutual TLS: the destination service presents the
//! workload certificate its [`CertManager`](sidemesh_identity_client::CertManager)
//! holds (as any proxy does) and requires a client certificate that chains to
//! the current trust bundle and names a SPIFFE ID.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sidemesh_identity_client::tls::{ALPN_H2, CurrentCert};
use sidemesh_identity_client::verify::ClientIdVerifier;
use sidemesh_identity_client::{TrustStore, WorkloadCert};
use sidemesh_proto::destination::v1::destination_server::DestinationServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::service::Discovery;

/// Largest request accepted: a subscription is a few dozen bytes.
const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Concurrent Discover streams per connection (a proxy needs one).
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Could not bind.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits until the server has stopped (after shutdown, once streams ended).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// The rustls configuration: TLS 1.3, our workload certificate, mesh client
/// certificates required, HTTP/2.
pub fn tls_config(
    certs: watch::Receiver<Option<Arc<WorkloadCert>>>,
    trust: TrustStore,
) -> Result<rustls::ServerConfig, StartError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(ClientIdVerifier::new(trust)))
        .with_cert_resolver(Arc::new(CurrentCert::new(certs)));
    tls.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(tls)
}

/// Binds `listen` and serves `discovery` until `shutdown` becomes true.
pub async fn start(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    discovery: Discovery,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Running, StartError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Listen { addr: listen, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr: listen, source })?;
    let incoming = tokio_stream::wrappers::ReceiverStream::new(sidemesh_identity_client::tls::incoming(
        listener,
        acceptor,
        shutdown.clone(),
    ));
    let service = DestinationServer::new(discovery).max_decoding_message_size(MAX_REQUEST_BYTES);
    let task = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            // Find proxies that vanished without closing (node lost, partition).
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move { stopped(&mut shutdown).await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "destination server stopped");
        }
    });
    Ok(Running { local_addr, task })
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
