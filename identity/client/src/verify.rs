//! rustls verifiers for mesh peers: the chain must lead to a root of the
//! *current* trust bundle (read at each handshake, so a bundle change applies
//! to the next connection), and the leaf's URI SAN is the peer's SPIFFE ID.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::TrustStore;
pub use webpki::KeyUsage;

use crate::spiffe::SpiffeId;

/// The SPIFFE IDs (URI SANs starting `spiffe://`) a certificate names.
pub fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    Ok(sans
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The one SPIFFE ID of a leaf; certificates naming none or several are not
/// mesh identities.
pub fn peer_id(der: &[u8]) -> Result<SpiffeId, String> {
    let uris = uri_sans(der)?;
    match uris.as_slice() {
        [one] => one.parse().map_err(|e: crate::spiffe::SpiffeIdError| e.to_string()),
        [] => Err("certificate has no URI SAN".into()),
        _ => Err("certificate has several URI SANs".into()),
    }
}

fn algorithms(provider: &CryptoProvider) -> WebPkiSupportedAlgorithms {
    provider.signature_verification_algorithms
}

/// Verifies `end_entity` + `intermediates` against `bundle` and returns the
/// root the chain leads to.
pub fn verify_chain<'b>(
    bundle: &'b crate::TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<&'b crate::bundle::Root, rustls::Error> {
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    let path = ee
        .verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            bundle.anchors(),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
    bundle
        .root_for_anchor(path.anchor())
        .ok_or(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(PkiError(format!("{other:?}"))))),
    };
    rustls::Error::InvalidCertificate(ce)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PkiError(String);

fn identity_error(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(PkiError(msg)))))
}

/// Client side: the server must chain to the bundle and present exactly
/// `expected` as its URI SAN. The TLS server name is not used for identity.
#[derive(Debug)]
pub struct ServerIdVerifier {
    store: TrustStore,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerIdVerifier {
    /// A verifier that accepts only `expected`.
    pub fn new(store: TrustStore, expected: SpiffeId) -> Self {
        Self {
            store,
            expected,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

impl ServerCertVerifier for ServerIdVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(
            &self.store.current(),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let uris = uri_sans(end_entity).map_err(identity_error)?;
        let want = self.expected.to_string();
        if uris.contains(&want) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(identity_error(format!("server presented {uris:?}, expected {want}")))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms(&self.provider))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms(&self.provider))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms(&self.provider).supported_schemes()
    }
}

/// Server side: the client must present a certificate chaining to the bundle
/// whose URI SAN is a SPIFFE ID; which IDs may do what is authorization, done
/// after the handshake with [`peer_id`].
#[derive(Debug)]
pub struct ClientIdVerifier {
    store: TrustStore,
    provider: Arc<CryptoProvider>,
}

impl ClientIdVerifier {
    /// A verifier requiring a mesh client certificate.
    pub fn new(store: TrustStore) -> Self {
        Self {
            store,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

impl ClientCertVerifier for ClientIdVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(
            &self.store.current(),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        peer_id(end_entity).map_err(identity_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms(&self.provider))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms(&self.provider))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms(&self.provider).supported_schemes()
    }
}
