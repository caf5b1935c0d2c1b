//! Mesh TLS: TLS 1.3 only, the workload certificate presented on both sides,
//! peers verified against the current trust bundle and (client side) the
//! exact SPIFFE ID the destination service says the endpoint has.
//!
//! Mesh connections announce themselves with ALPN: `sidemesh.h2` carries HTTP
//! requests over one pooled HTTP/2 connection per peer, `sidemesh.tcp` one
//! opaque stream. The inbound side tells them apart from an application's own
//! TLS by that ALPN.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::{ClientConfig, ServerConfig};
use sidemesh_identity_client::tls::CurrentCert;
use sidemesh_identity_client::verify::{ClientIdVerifier, ServerIdVerifier};
use sidemesh_identity_client::{SpiffeId, TrustBundle, TrustStore};

/// ALPN of HTTP carried between proxies over HTTP/2.
pub const ALPN_HTTP: &[u8] = b"sidemesh.h2";
/// ALPN of an opaque TCP stream between proxies.
pub const ALPN_TCP: &[u8] = b"sidemesh.tcp";

/// A client configuration is per peer identity and ALPN.
type ClientKey = (SpiffeId, &'static [u8]);

/// The TLS configurations of one proxy.
#[derive(Debug)]
pub struct MeshTls {
    cert: CurrentCert,
    trust: TrustStore,
    state: Mutex<Configs>,
}

/// Configurations made under one trust bundle. They hold the TLS session
/// caches, and a resumed session skips certificate verification: when the
/// bundle changes they are all made anew, so nothing established under a
/// root that is no longer trusted can be resumed.
#[derive(Debug)]
struct Configs {
    bundle: Arc<TrustBundle>,
    server: Arc<ServerConfig>,
    // One client config per peer identity: reusing it lets reconnections
    // resume instead of running full handshakes.
    clients: HashMap<ClientKey, Arc<ClientConfig>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl MeshTls {
    /// Configurations presenting `cert` and verifying against `trust`.
    pub fn new(cert: CurrentCert, trust: TrustStore) -> Result<Self, rustls::Error> {
        let configs = Configs {
            bundle: trust.current(),
            server: Self::make_server(&cert, &trust)?,
            clients: HashMap::new(),
        };
        Ok(Self {
            cert,
            trust,
            state: Mutex::new(configs),
        })
    }

    fn make_server(cert: &CurrentCert, trust: &TrustStore) -> Result<Arc<ServerConfig>, rustls::Error> {
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(ClientIdVerifier::new(trust.clone())))
            .with_cert_resolver(Arc::new(cert.clone()));
        server.alpn_protocols = vec![ALPN_HTTP.to_vec(), ALPN_TCP.to_vec()];
        server.max_early_data_size = 0;
        Ok(Arc::new(server))
    }

    /// The configurations for the bundle in force, remade if it changed.
    fn configs(&self) -> Result<std::sync::MutexGuard<'_, Configs>, rustls::Error> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let bundle = self.trust.current();
        if !Arc::ptr_eq(&bundle, &state.bundle) {
            state.server = Self::make_server(&self.cert, &self.trust)?;
            state.clients.clear();
            state.bundle = bundle;
        }
        Ok(state)
    }

    /// The inbound side's configuration.
    pub fn server(&self) -> Result<Arc<ServerConfig>, rustls::Error> {
        Ok(self.configs()?.server.clone())
    }

    /// A client configuration that accepts only `peer` and offers `alpn`.
    pub fn client(&self, peer: &SpiffeId, alpn: &'static [u8]) -> Result<Arc<ClientConfig>, rustls::Error> {
        let key = (peer.clone(), alpn);
        let mut configs = self.configs()?;
        if let Some(c) = configs.clients.get(&key) {
            return Ok(c.clone());
        }
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerIdVerifier::new(self.trust.clone(), peer.clone())))
            .with_client_cert_resolver(Arc::new(self.cert.clone()));
        config.alpn_protocols = vec![alpn.to_vec()];
        let config = Arc::new(config);
        configs.clients.insert(key, config.clone());
        Ok(config)
    }
}
