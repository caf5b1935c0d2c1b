//! A fresh ECDSA P-256 key, kept in memory, and the PKCS#10 request that asks
//! the identity service to certify it for a SPIFFE ID.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

use crate::SpiffeId;

/// Why a CSR could not be made (only on a broken crypto library).
#[derive(Debug, thiserror::Error)]
#[error("making a CSR: {0}")]
pub struct CsrError(#[from] rcgen::Error);

/// A new key and a DER CSR for `id`; the CSR's only SAN is the ID's URI.
pub fn generate(id: &SpiffeId) -> Result<(KeyPair, Vec<u8>), CsrError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}
