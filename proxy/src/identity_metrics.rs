//! The proxy's identity as metrics: its certificate's expiry and chain
//! (issuer and root fingerprints) and the roots it trusts, read from the
//! [`CertManager`] and [`TrustStore`] at each scrape, so that "how many
//! proxies are on the new chain" is a query during a root rotation.

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;
use sidemesh_identity_client::{CertManager, TrustStore};

fn unix_seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Registers the identity gauges on `meter`. Without an identity (plaintext
/// mode) nothing is registered: there is nothing to report.
///
/// - `sidemesh.proxy.certificate.expiry_timestamp`: end of validity, Unix seconds;
/// - `sidemesh.proxy.certificate.info`: 1, labelled `identity`,
///   `issuer_fingerprint`, `root_fingerprint`;
/// - `sidemesh.proxy.trust.roots`: number of trusted roots;
/// - `sidemesh.proxy.trust.root.info`: 1 per trusted root, labelled `fingerprint`.
pub fn register(meter: &Meter, certs: Option<&CertManager>, trust: Option<&TrustStore>) {
    if let Some(certs) = certs {
        let held = certs.clone();
        meter
            .f64_observable_gauge("sidemesh.proxy.certificate.expiry_timestamp")
            .with_description("End of validity of the workload certificate in use, Unix time")
            .with_unit("s")
            .with_callback(move |obs| {
                if let Some(cert) = held.current() {
                    obs.observe(unix_seconds(cert.not_after), &[]);
                }
            })
            .build();
        let held = certs.clone();
        meter
            .u64_observable_gauge("sidemesh.proxy.certificate.info")
            .with_description(
                "The workload certificate in use: its identity and the fingerprints of its issuer and root",
            )
            .with_callback(move |obs| {
                if let Some(cert) = held.current() {
                    obs.observe(
                        1,
                        &[
                            KeyValue::new("identity", cert.id.to_string()),
                            KeyValue::new("issuer_fingerprint", cert.issuer_fingerprint.clone()),
                            KeyValue::new("root_fingerprint", cert.root_fingerprint.clone()),
                        ],
                    );
                }
            })
            .build();
    }
    if let Some(trust) = trust {
        let store = trust.clone();
        meter
            .u64_observable_gauge("sidemesh.proxy.trust.roots")
            .with_description("Roots in the trust bundle in force")
            .with_unit("{root}")
            .with_callback(move |obs| obs.observe(store.current().roots().len() as u64, &[]))
            .build();
        let store = trust.clone();
        meter
            .u64_observable_gauge("sidemesh.proxy.trust.root.info")
            .with_description("Each root of the trust bundle in force, by fingerprint")
            .with_callback(move |obs| {
                for root in store.current().roots() {
                    obs.observe(1, &[KeyValue::new("fingerprint", root.fingerprint.clone())]);
                }
            })
            .build();
    }
}
