//! The gRPC client of the identity service, over TLS that checks the server's
//! SPIFFE ID against the current trust bundle.

use std::sync::Arc;

use rustls_pki_types::ServerName;
use sidemesh_proto::identity::v1::identity_client::IdentityClient;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{ALPN_H2, CurrentCert};
use crate::verify::ServerIdVerifier;
use crate::{SpiffeId, TrustStore};

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not `host:port`.
    #[error("identity address {0:?} is not host:port")]
    Address(String),
}

/// A lazily connected channel to a sidemesh control-plane gRPC server at
/// `addr` (`host:port`) that must present `server_id`. Reconnects on its own.
pub fn channel(addr: &str, server_id: SpiffeId, trust: TrustStore) -> Result<Channel, ClientError> {
    tls_channel(addr, server_id, trust, None)
}

/// As [`channel`], presenting the workload certificate `cert` (mTLS), as
/// proxies do towards the destination service.
pub fn mtls_channel(
    addr: &str,
    server_id: SpiffeId,
    trust: TrustStore,
    cert: CurrentCert,
) -> Result<Channel, ClientError> {
    tls_channel(addr, server_id, trust, Some(cert))
}

fn tls_channel(
    addr: &str,
    server_id: SpiffeId,
    trust: TrustStore,
    cert: Option<CurrentCert>,
) -> Result<Channel, ClientError> {
    let (host, _port) = addr
        .rsplit_once(':')
        .ok_or_else(|| ClientError::Address(addr.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let server_name = ServerName::try_from(host).map_err(|_| ClientError::Address(addr.to_owned()))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|_| ClientError::Address(addr.to_owned()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerIdVerifier::new(trust, server_id)));
    let mut config = match cert {
        Some(cert) => config.with_client_cert_resolver(Arc::new(cert)),
        None => config.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = addr.to_owned();
    let endpoint =
        Endpoint::from_shared(format!("http://{addr}")).map_err(|_| ClientError::Address(addr.to_owned()))?;
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            let _ = tcp.set_nodelay(true);
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    })))
}

/// A client of the identity service.
pub fn identity_client(
    addr: &str,
    server_id: SpiffeId,
    trust: TrustStore,
) -> Result<IdentityClient<Channel>, ClientError> {
    Ok(IdentityClient::new(channel(addr, server_id, trust)?))
}
