//! Mesh TLS: TLS 1.3 only, the workload certificate presented on both sides,
//! peers verified against the current trust bundle and (client side) the
//! exact SPIFFE ID the destination service says the endpoint has.
//!
//! Mesh connections announce themselves with ALPN: `sidemesh.h2` carries HTTP
//! requests over one pooled HTTP/2 connection per peer, `sidemesh.http1` one
//! HTTP/1.1 upgrade request (WebSocket) and then its upgraded bytes,
//! `sidemesh.tcp` one opaque stream. The inbound side tells them apart from
//! an application's own TLS by that ALPN.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::{ClientConfig, ServerConfig};
use sidemesh_identity_client::tls::CurrentCert;
use sidemesh_identity_client::verify::{ClientIdVerifier, ServerIdVerifier};
use sidemesh_identity_client::{SpiffeId, TrustBundle, TrustStore};

/// ALPN of HTTP carried between proxies over HTTP/2.
pub const ALPN_HTTP: &[u8] = b"sidemesh.h2";
/// ALPN of one HTTP/1.1 upgrade request between proxies (HTTP/2 cannot
/// carry one), after a `101` the upgraded connection.
pub const ALPN_HTTP1: &[u8] = b"sidemesh.http1";
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

/// ring's TLS 1.3 suites with AES-128-GCM first (ring's default puts
/// AES-256 first). Both ends are sidemesh proxies, so the mesh picks the
/// cheaper suite: 10 AES rounds instead of 14 and SHA-256 in the key
/// schedule, for the security level of the rest of the mesh (P-256 keys).
/// linkerd2-proxy makes the same choice. All three suites stay accepted.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
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
        server.alpn_protocols = vec![ALPN_HTTP.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
        server.max_early_data_size = 0;
        // The server's order wins, so a peer that prefers AES-256 (an older
        // sidemesh) still gets AES-128.
        server.ignore_client_order = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use sidemesh_identity_client::manager::WorkloadCert;
    use std::time::SystemTime;

    fn workload(issuer: &Issuer<'_, KeyPair>, id: &SpiffeId) -> CurrentCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let cert = params.signed_by(&key, issuer).unwrap();
        let chain = vec![cert.der().clone()];
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
        let wc = WorkloadCert {
            id: id.clone(),
            chain: chain.clone(),
            certified_key: Arc::new(rustls::sign::CertifiedKey::new(chain, signing)),
            not_before: SystemTime::now(),
            not_after: SystemTime::now(),
            issuer_fingerprint: String::new(),
            root_fingerprint: String::new(),
        };
        let (_tx, rx) = tokio::sync::watch::channel(Some(Arc::new(wc)));
        CurrentCert::new(rx)
    }

    /// Two proxies agree on AES-128-GCM, also when the client prefers
    /// AES-256 as rustls's default order does.
    #[test]
    fn mesh_peers_negotiate_aes_128_gcm() {
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::default();
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key).unwrap();
        let bundle = TrustBundle::from_der(vec![CertificateDer::from(root_cert.der().to_vec())]).unwrap();
        let issuer = Issuer::new(root, root_key);
        let trust = TrustStore::new(bundle);
        let (a, b) = (
            SpiffeId::new("cluster.local", "default", "a").unwrap(),
            SpiffeId::new("cluster.local", "default", "b").unwrap(),
        );
        let server = MeshTls::new(workload(&issuer, &b), trust.clone()).unwrap();
        let client = MeshTls::new(workload(&issuer, &a), trust.clone()).unwrap();

        let mine = client.client(&b, ALPN_TCP).unwrap();
        // What a peer on rustls's default order (AES-256 first) offers.
        let mut aes256_first = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerIdVerifier::new(trust.clone(), b.clone())))
            .with_client_cert_resolver(mine.client_auth_cert_resolver.clone());
        aes256_first.alpn_protocols = vec![ALPN_TCP.to_vec()];
        assert_eq!(
            aes256_first.crypto_provider().cipher_suites[0],
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384
        );

        for config in [mine, Arc::new(aes256_first)] {
            let name = ServerName::try_from("peer").unwrap();
            let mut c = rustls::ClientConnection::new(config, name).unwrap();
            let mut s = rustls::ServerConnection::new(server.server().unwrap()).unwrap();
            for _ in 0..10 {
                let mut wire = Vec::new();
                c.write_tls(&mut wire).unwrap();
                s.read_tls(&mut wire.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                let mut wire = Vec::new();
                s.write_tls(&mut wire).unwrap();
                c.read_tls(&mut wire.as_slice()).unwrap();
                c.process_new_packets().unwrap();
                if !c.is_handshaking() && !s.is_handshaking() {
                    break;
                }
            }
            assert!(!c.is_handshaking() && !s.is_handshaking(), "handshake did not finish");
            let suite = c.negotiated_cipher_suite().map(|s| s.suite());
            assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
            assert_eq!(s.negotiated_cipher_suite().map(|s| s.suite()), suite);
        }
    }
}
