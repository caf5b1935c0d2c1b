//! Trust bundles: the set of roots a component trusts, parsed from PEM, and
//! the [`TrustStore`] that holds the current one while it is swapped live.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, TrustAnchor};
use tokio::sync::watch;

use crate::fingerprint;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The file could not be read.
    #[error("reading trust bundle {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not PEM, or holds something other than certificates.
    #[error("trust bundle is not valid PEM: {0}")]
    Pem(String),
    /// No certificate at all.
    #[error("trust bundle holds no certificate")]
    Empty,
    /// A certificate that cannot be a root.
    #[error("trust bundle certificate #{index}: {reason}")]
    BadRoot {
        /// Position in the file, from 1.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// One trusted root.
#[derive(Debug, Clone)]
pub struct Root {
    /// The certificate.
    pub der: CertificateDer<'static>,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// Subject, for people.
    pub subject: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// An immutable set of trusted roots, deduplicated, in file order.
#[derive(Debug)]
pub struct TrustBundle {
    roots: Vec<Root>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Parses PEM text holding one or more CA certificates.
    pub fn from_pem(pem: &[u8]) -> Result<Self, BundleError> {
        let mut ders = Vec::new();
        for item in CertificateDer::pem_slice_iter(pem) {
            ders.push(item.map_err(|e| BundleError::Pem(e.to_string()))?);
        }
        // pem_slice_iter skips text between blocks; a file whose only content
        // is garbage must not pass as an empty-but-valid bundle.
        if ders.is_empty() {
            return Err(if pem.windows(11).any(|w| w == b"-----BEGIN ") {
                BundleError::Pem("no CERTIFICATE block".into())
            } else {
                BundleError::Empty
            });
        }
        Self::from_der(ders)
    }

    /// Builds a bundle from DER certificates, checking that each is a CA.
    pub fn from_der(ders: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        let mut roots: Vec<Root> = Vec::with_capacity(ders.len());
        let mut anchors = Vec::with_capacity(ders.len());
        for (i, der) in ders.into_iter().enumerate() {
            let bad = |reason: String| BundleError::BadRoot { index: i + 1, reason };
            let (_, cert) =
                x509_parser::parse_x509_certificate(&der).map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
            let is_ca = cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca);
            if !is_ca {
                return Err(bad(format!("{} is not a CA certificate", cert.subject())));
            }
            let fp = fingerprint(&der);
            if roots.iter().any(|r| r.fingerprint == fp) {
                continue;
            }
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| bad(format!("unusable as a trust anchor: {e:?}")))?
                .to_owned();
            let not_after = SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
            roots.push(Root {
                subject: cert.subject().to_string(),
                fingerprint: fp,
                not_after,
                der: der.clone(),
            });
            anchors.push(anchor);
        }
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(Self { roots, anchors })
    }

    /// Reads and parses a bundle file.
    pub fn from_file(path: &Path) -> Result<Self, BundleError> {
        let pem = std::fs::read(path).map_err(|source| BundleError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&pem)
    }

    /// The roots.
    pub fn roots(&self) -> &[Root] {
        &self.roots
    }

    /// The roots as webpki trust anchors.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The roots' fingerprints.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|r| r.fingerprint.clone()).collect()
    }

    /// The root whose subject matches `anchor` (from a verified path).
    pub fn root_for_anchor(&self, anchor: &TrustAnchor<'_>) -> Option<&Root> {
        self.anchors
            .iter()
            .position(|a| a.subject == anchor.subject && a.subject_public_key_info == anchor.subject_public_key_info)
            .map(|i| &self.roots[i])
    }

    /// PEM text of the bundle.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|r| pem_encode("CERTIFICATE", &r.der)).collect()
    }
}

/// PEM-encodes one DER object (LF line endings).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The current bundle of a process, swapped when its file changes; readers
/// (each new TLS handshake) see the new one at once.
#[derive(Debug, Clone)]
pub struct TrustStore {
    tx: Arc<watch::Sender<Arc<TrustBundle>>>,
}

impl TrustStore {
    /// A store holding `bundle`.
    pub fn new(bundle: TrustBundle) -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(Arc::new(bundle))),
        }
    }

    /// The bundle in force.
    pub fn current(&self) -> Arc<TrustBundle> {
        self.tx.borrow().clone()
    }

    /// Replaces the bundle.
    pub fn set(&self, bundle: TrustBundle) {
        self.tx.send_replace(Arc::new(bundle));
    }

    /// Notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.tx.subscribe()
    }

    /// Loads `path` and keeps the store in step with it: a changed file that
    /// parses replaces the bundle; one that does not is logged and ignored.
    pub fn watch_file(path: &Path) -> Result<Self, BundleError> {
        let bundle = TrustBundle::from_file(path)?;
        let store = Self::new(bundle);
        let weak = Arc::downgrade(&store.tx);
        let shown = path.display().to_string();
        crate::watch::spawn(path.to_owned(), move |bytes| {
            let Some(tx) = weak.upgrade() else {
                return false;
            };
            match TrustBundle::from_pem(bytes) {
                Ok(b) => {
                    if b.fingerprints() != tx.borrow().fingerprints() {
                        tracing::info!(path = %shown, roots = ?b.fingerprints(), "trust bundle reloaded");
                        tx.send_replace(Arc::new(b));
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %shown, error = %e, "trust bundle refused; keeping the previous one")
                }
            }
            true
        });
        Ok(store)
    }
}
