//! Checking a PKCS#10 request: well-formed DER, a signature that verifies
//! with the key it carries, an ECDSA P-256 key, and SANs.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer as _;

/// A request whose signature verified.
#[derive(Debug)]
pub struct CheckedCsr {
    /// The key to certify.
    pub public_key: rcgen::SubjectPublicKeyInfo,
    /// URI SANs it asks for.
    pub uris: Vec<String>,
    /// Whether it asks for SANs other than URIs (DNS names, IPs, e-mail).
    pub other_sans: bool,
}

/// Why a CSR is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Empty field.
    #[error("certificate_signing_request is empty")]
    Empty,
    /// Not DER PKCS#10.
    #[error("certificate_signing_request is not a DER PKCS#10 request: {0}")]
    Malformed(String),
    /// Signature does not verify.
    #[error("certificate_signing_request signature does not verify with its own key")]
    BadSignature,
    /// A key other than ECDSA P-256.
    #[error("certificate_signing_request key must be ECDSA P-256")]
    KeyType,
}

/// Parses and verifies a DER CSR.
pub fn check(der: &[u8]) -> Result<CheckedCsr, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|_| CsrError::KeyType)?;
    if rcgen::PublicKeyData::algorithm(&public_key) != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::KeyType);
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let mut uris = Vec::new();
    let mut other_sans = false;
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => uris.push((*u).to_owned()),
                        _ => other_sans = true,
                    }
                }
            }
            ParsedExtension::UnsupportedExtension { .. } | ParsedExtension::ParseError { .. } => {}
            _ => {}
        }
    }
    Ok(CheckedCsr {
        public_key,
        uris,
        other_sans,
    })
}
