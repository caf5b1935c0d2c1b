//! Making roots and issuers: what `sidemesh trust new-root` / `new-issuer`
//! run, and what tests use to build their PKI.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};

use crate::issuer::BACKDATE;

/// A certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate.
    pub cert: String,
    /// The PKCS#8 private key.
    pub key: String,
}

/// Why a CA could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The signing CA given is unusable.
    #[error("{0}")]
    Signer(String),
    /// Certificate generation failed.
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn ca_params(
    common_name: &str,
    trust_domain: &str,
    not_after: SystemTime,
    path_len: Option<u8>,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sidemesh");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.not_before = (SystemTime::now() - BACKDATE).into();
    params.not_after = not_after.into();
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn stamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// A new self-signed root for `trust_domain`, ECDSA P-256.
pub fn new_root(trust_domain: &str, lifetime: Duration) -> Result<PemPair, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let name = format!("sidemesh root CA {trust_domain} {}", stamp());
    let params = ca_params(&name, trust_domain, SystemTime::now() + lifetime, None)?;
    let cert = params.self_signed(&key)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A new issuer (intermediate CA, path length 0) signed by the root given as
/// PEM; it never outlives the root.
pub fn new_issuer(root_cert_pem: &str, root_key_pem: &str, lifetime: Duration) -> Result<PemPair, CaError> {
    let root_key = KeyPair::from_pem(root_key_pem).map_err(|e| CaError::Signer(format!("root key: {e}")))?;
    let root_der = rustls_pki_types::pem::PemObject::from_pem_slice(root_cert_pem.as_bytes())
        .map_err(|e| CaError::Signer(format!("root certificate: {e}")))?;
    let root_der: rustls_pki_types::CertificateDer<'static> = root_der;
    let (_, parsed) = x509_parser::parse_x509_certificate(&root_der)
        .map_err(|e| CaError::Signer(format!("root certificate: {e}")))?;
    if parsed.public_key().subject_public_key.data.as_ref() != root_key.public_key_raw() {
        return Err(CaError::Signer("root key does not match the root certificate".into()));
    }
    if !parsed.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca) {
        return Err(CaError::Signer("the root certificate is not a CA".into()));
    }
    let trust_domain = sidemesh_identity_client::verify::uri_sans(&root_der)
        .ok()
        .and_then(|u| {
            u.into_iter()
                .find_map(|u| u.strip_prefix("spiffe://").map(str::to_owned))
        })
        .unwrap_or_else(|| "cluster.local".to_owned());
    let root_not_after =
        SystemTime::UNIX_EPOCH + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
    let not_after = (SystemTime::now() + lifetime).min(root_not_after);
    let signer = rcgen::Issuer::from_ca_cert_der(&root_der, root_key)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let name = format!("sidemesh issuer {trust_domain} {}", stamp());
    let params = ca_params(&name, &trust_domain, not_after, Some(0))?;
    let cert = params.signed_by(&key, &signer)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}
