//! The issuing CA: loaded from PEM files (a plain cert/key pair, or a
//! cert-manager `tls.crt`/`tls.key` pair whose `tls.crt` carries the chain),
//! checked against the trust bundle, and used to sign workload leaves.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use sidemesh_identity_client::{SpiffeId, TrustBundle, fingerprint};
use x509_parser::certificate::X509Certificate;

/// Clock skew allowance: leaves start this long before they are issued.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Why an issuer was refused.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate file holds no usable certificate.
    #[error("issuer certificate: {0}")]
    Cert(String),
    /// The key file holds no usable key.
    #[error("issuer key: {0}")]
    Key(String),
    /// The key is not the certificate's.
    #[error("issuer key does not match the issuer certificate")]
    KeyMismatch,
    /// Not a CA.
    #[error("issuer certificate {0} is not a CA (basicConstraints cA is not set)")]
    NotCa(String),
    /// Expired or not yet valid.
    #[error("issuer certificate {0} is not valid now")]
    Validity(String),
    /// Does not lead to a bundled root.
    #[error("issuer certificate {0} does not chain to any root of the trust bundle")]
    Untrusted(String),
}

/// Where the issuer comes from.
#[derive(Debug, Clone)]
pub struct IssuerFiles {
    /// PEM certificate, optionally followed by its chain.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key.
    pub key: PathBuf,
}

impl IssuerFiles {
    /// A cert-manager / `kubernetes.io/tls` Secret mounted at `dir`.
    pub fn tls_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }
}

/// A loaded, checked issuer.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    /// The chain sent with each leaf: the issuer, then any intermediates
    /// between it and the root (roots themselves are not sent).
    chain: Vec<CertificateDer<'static>>,
    fingerprint: String,
    root_fingerprint: String,
    subject: String,
    not_after: SystemTime,
    loaded_at: SystemTime,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("subject", &self.subject)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, IssuerError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| IssuerError::Cert(format!("not an X.509 certificate: {e}")))
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca)
}

impl Issuer {
    /// Reads and checks the issuer files against `bundle`.
    pub fn load(files: &IssuerFiles, bundle: &TrustBundle) -> Result<Self, IssuerError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| IssuerError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Self::from_pem(&read(&files.cert)?, &read(&files.key)?, bundle)
    }

    /// Checks an issuer given as PEM text.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], bundle: &TrustBundle) -> Result<Self, IssuerError> {
        let mut certs = Vec::new();
        for c in CertificateDer::pem_slice_iter(cert_pem) {
            certs.push(c.map_err(|e| IssuerError::Cert(format!("not valid PEM: {e}")))?);
        }
        let Some(issuer_der) = certs.first().cloned() else {
            return Err(IssuerError::Cert("no CERTIFICATE block".into()));
        };
        let key_text = std::str::from_utf8(key_pem).map_err(|_| IssuerError::Key("not PEM text".into()))?;
        if key_text.contains("BEGIN EC PRIVATE KEY") || key_text.contains("BEGIN RSA PRIVATE KEY") {
            return Err(IssuerError::Key(
                "the key must be PKCS#8 (\"BEGIN PRIVATE KEY\"); with cert-manager set privateKey.encoding: PKCS8"
                    .into(),
            ));
        }
        let key = KeyPair::from_pem(key_text).map_err(|e| IssuerError::Key(e.to_string()))?;

        let cert = parse(&issuer_der)?;
        let subject = cert.subject().to_string();
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(IssuerError::KeyMismatch);
        }
        if !is_ca(&cert) {
            return Err(IssuerError::NotCa(subject));
        }
        if !cert.validity().is_valid() {
            return Err(IssuerError::Validity(subject));
        }
        let not_after = to_system_time(cert.validity().not_after);

        // Walk the file's chain upwards until a bundled root signs (or is) a link.
        let roots = bundle.roots();
        let mut chain: Vec<CertificateDer<'static>> = Vec::new();
        let mut root_fingerprint = None;
        for der in &certs {
            let fp = fingerprint(der);
            if let Some(root) = roots.iter().find(|r| r.fingerprint == fp) {
                root_fingerprint = Some(root.fingerprint.clone());
                break;
            }
            let link = parse(der)?;
            if let Some(prev) = chain.last() {
                let prev = parse(prev)?;
                if prev.verify_signature(Some(link.public_key())).is_err() {
                    return Err(IssuerError::Untrusted(subject));
                }
            }
            chain.push(der.clone());
            let signer = roots.iter().find(|r| {
                parse(&r.der).is_ok_and(|root| {
                    root.subject() == link.issuer() && link.verify_signature(Some(root.public_key())).is_ok()
                })
            });
            if let Some(root) = signer {
                root_fingerprint = Some(root.fingerprint.clone());
                break;
            }
        }
        let root_fingerprint = root_fingerprint.ok_or_else(|| IssuerError::Untrusted(subject.clone()))?;
        let signer = rcgen::Issuer::from_ca_cert_der(&issuer_der, key).map_err(|e| IssuerError::Cert(e.to_string()))?;
        Ok(Self {
            signer,
            chain,
            fingerprint: fingerprint(&issuer_der),
            root_fingerprint,
            subject,
            not_after,
            loaded_at: SystemTime::now(),
        })
    }

    /// SHA-256 of the issuer certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// SHA-256 of the root it chains to.
    pub fn root_fingerprint(&self) -> &str {
        &self.root_fingerprint
    }

    /// The issuer's subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// End of the issuer's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When this issuer was loaded (went into service).
    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }

    /// The intermediates sent with each leaf, leaf-most first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Signs a workload leaf for `id`: ECDSA P-256 key from the CSR, not a CA,
    /// serverAuth + clientAuth, valid from `now - BACKDATE` for `lifetime`
    /// but never past the issuer's own end. `dns_names` are added for the
    /// control plane's serving certificates.
    pub fn sign(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<(CertificateDer<'static>, SystemTime), rcgen::Error> {
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = (now + lifetime).min(self.not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.subject_alt_names = Vec::with_capacity(1 + dns_names.len());
        params.subject_alt_names.push(SanType::URI(id.to_string().try_into()?));
        for dns in dns_names {
            params.subject_alt_names.push(SanType::DnsName(dns.clone().try_into()?));
        }
        let cert = params.signed_by(public_key, &self.signer)?;
        Ok((cert.der().clone(), not_after))
    }
}

/// A positive 127-bit serial (RFC 5280 allows up to 20 octets).
fn random_serial() -> [u8; 16] {
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    serial
}
