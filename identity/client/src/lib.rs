//! The workload side of mesh identity, shared by the proxy, the destination
//! service and the identity service itself:
//!
//! - [`spiffe`]: SPIFFE IDs of the form `spiffe://<td>/ns/<ns>/sa/<sa>`;
//! - [`bundle`]: trust bundles (one or more roots) and their fingerprints;
//! - [`watch`]: re-reading a file when it changes (including the symlink swap
//!   of a mounted ConfigMap or Secret);
//! - [`verify`]: rustls verifiers that check a peer's chain against the
//!   current bundle and its SPIFFE ID against what is expected;
//! - [`tls`]: rustls configurations that follow certificate and bundle changes
//!   without being rebuilt;
//! - [`csr`] and [`client`]: the key kept in memory, the CSR, the `Certify` call;
//! - [`settings`]: the `SIDEMESH_*` identity settings every workload takes;
//! - [`manager`]: keeps a workload certificate fresh (renewal at 70% of its
//!   lifetime with jitter, backoff on failure while the current one stays in use).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bundle;
pub mod client;
pub mod csr;
pub mod manager;
pub mod settings;
pub mod spiffe;
pub mod tls;
pub mod verify;
pub mod watch;

pub use bundle::{TrustBundle, TrustStore};
pub use manager::{CertManager, WorkloadCert};
pub use spiffe::SpiffeId;

/// SHA-256 of a DER blob as lowercase hex without separators: how sidemesh
/// names certificates in metrics, logs and `/debug/state`.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(der))
}

/// Installs ring as the process's rustls crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
