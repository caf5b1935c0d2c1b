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
