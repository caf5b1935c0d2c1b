//! The webhook's own small PKI: a CA the API server trusts (the webhook
//! configuration's `caBundle`) and a serving certificate for the injector's
//! Service names. It is separate from the mesh's root of trust: rotating one
//! never touches the other.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The injector's Service names, as the API server dials them.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// A CA and a serving certificate signed by it, as PEM.
#[derive(Debug, Clone)]
pub struct WebhookPki {
    /// The CA certificate: the webhook configuration's `caBundle`.
    pub ca_cert: String,
    /// The serving certificate (the injector's `--tls-cert`).
    pub cert: String,
    /// Its key (the injector's `--tls-key`).
    pub key: String,
}

/// Why the PKI could not be made.
#[derive(Debug, thiserror::Error)]
#[error("making the webhook certificates: {0}")]
pub struct CertError(#[from] rcgen::Error);

/// Makes a CA and a serving certificate for `dns_names` (and any IP
/// addresses among them), valid for `lifetime` (backdated one minute for
/// clock skew).
pub fn webhook_pki(dns_names: &[String], lifetime: Duration) -> Result<WebhookPki, CertError> {
    let not_before = SystemTime::now() - Duration::from_secs(60);
    let not_after = SystemTime::now() + lifetime;
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sidemesh");
    dn.push(DnType::CommonName, "sidemesh injector webhook CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    ca.not_before = not_before.into();
    ca.not_after = not_after.into();
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut leaf = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sidemesh");
    dn.push(
        DnType::CommonName,
        dns_names.first().map(String::as_str).unwrap_or("sidemesh-injector"),
    );
    leaf.distinguished_name = dn;
    leaf.subject_alt_names = dns_names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = not_before.into();
    leaf.not_after = not_after.into();
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(WebhookPki {
        ca_cert: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}
