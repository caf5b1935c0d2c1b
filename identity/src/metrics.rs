//! The identity service's instruments, and the expiry watch on its issuer
//! and bundled roots.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use sidemesh_identity_client::TrustStore;
use sidemesh_telemetry::metrics::LATENCY_BUCKETS;
use tokio::sync::watch;

use crate::issuer::Issuer;

/// A CA closer than this to its end is warned about (log and metric).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86400);

/// How often the expiry warning is repeated while it holds.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Instruments of the certificate authority.
#[derive(Clone, Debug)]
pub struct IdentityMetrics {
    issued: Counter<u64>,
    refused: Counter<u64>,
    duration: Histogram<f64>,
    reloads: Counter<u64>,
    meter: Meter,
}

impl IdentityMetrics {
    /// Registers the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        Self {
            issued: meter
                .u64_counter("sidemesh.identity.certificates.issued")
                .with_description("Workload certificates issued")
                .with_unit("{certificate}")
                .build(),
            refused: meter
                .u64_counter("sidemesh.identity.certificates.refused")
                .with_description("Certify requests refused, by reason")
                .with_unit("{request}")
                .build(),
            duration: meter
                .f64_histogram("sidemesh.identity.certify.duration")
                .with_description("Time to answer a Certify request, token review included")
                .with_unit("s")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            reloads: meter
                .u64_counter("sidemesh.identity.issuer.reloads")
                .with_description("Issuer reloads from changed files, by result")
                .with_unit("{reload}")
                .build(),
            meter: meter.clone(),
        }
    }

    /// Counts an issued certificate.
    pub fn issued(&self, seconds: f64) {
        self.issued.add(1, &[]);
        self.duration.record(seconds, &[KeyValue::new("outcome", "issued")]);
    }

    /// Counts a refusal.
    pub fn refused(&self, reason: &'static str, seconds: f64) {
        self.refused.add(1, &[KeyValue::new("reason", reason)]);
        self.duration.record(seconds, &[KeyValue::new("outcome", "refused")]);
    }

    /// Counts an issuer reload attempt.
    pub fn reload(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.reloads.add(1, &[KeyValue::new("result", result)]);
    }

    /// Exports the time left before the issuer in service and each bundled
    /// root expire (`sidemesh.identity.ca.time_to_expiry`, labelled by kind and
    /// fingerprint) and how many are within [`EXPIRY_WARNING`]
    /// (`sidemesh.identity.ca.expiring`), and logs a warning for each of those
    /// at every issuer or bundle change and hourly.
    pub fn watch_expiry(&self, issuer: watch::Receiver<Arc<Issuer>>, trust: TrustStore) {
        let observed = (issuer.clone(), trust.clone());
        self.meter
            .f64_observable_gauge("sidemesh.identity.ca.time_to_expiry")
            .with_description("Seconds until the issuer in service and each bundled root expire (negative: expired)")
            .with_unit("s")
            .with_callback(move |obs| {
                for ca in expiring_cas(&observed.0, &observed.1) {
                    obs.observe(
                        ca.seconds_left,
                        &[
                            KeyValue::new("kind", ca.kind),
                            KeyValue::new("fingerprint", ca.fingerprint),
                        ],
                    );
                }
            })
            .build();
        let observed = (issuer.clone(), trust.clone());
        self.meter
            .u64_observable_gauge("sidemesh.identity.ca.expiring")
            .with_description("CAs (the issuer in service, bundled roots) within 30 days of expiry, by kind")
            .with_unit("{ca}")
            .with_callback(move |obs| {
                let cas = expiring_cas(&observed.0, &observed.1);
                for kind in ["issuer", "root"] {
                    let n = cas.iter().filter(|c| c.kind == kind && c.warn()).count();
                    obs.observe(n as u64, &[KeyValue::new("kind", kind)]);
                }
            })
            .build();
        tokio::spawn(warn_expiry(issuer, trust));
    }
}

/// One CA and how long it has left.
struct CaExpiry {
    kind: &'static str,
    fingerprint: String,
    subject: String,
    seconds_left: f64,
}

impl CaExpiry {
    fn warn(&self) -> bool {
        self.seconds_left < EXPIRY_WARNING.as_secs_f64()
    }
}

fn seconds_until(t: SystemTime) -> f64 {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn expiring_cas(issuer: &watch::Receiver<Arc<Issuer>>, trust: &TrustStore) -> Vec<CaExpiry> {
    let issuer = issuer.borrow().clone();
    let mut cas = vec![CaExpiry {
        kind: "issuer",
        fingerprint: issuer.fingerprint().to_owned(),
        subject: issuer.subject().to_owned(),
        seconds_left: seconds_until(issuer.not_after()),
    }];
    cas.extend(trust.current().roots().iter().map(|r| CaExpiry {
        kind: "root",
        fingerprint: r.fingerprint.clone(),
        subject: r.subject.clone(),
        seconds_left: seconds_until(r.not_after),
    }));
    cas
}

/// Logs a warning for each CA near its end: at start, at every change, hourly.
async fn warn_expiry(mut issuer: watch::Receiver<Arc<Issuer>>, trust: TrustStore) {
    let mut bundle = trust.subscribe();
    loop {
        for ca in expiring_cas(&issuer, &trust).into_iter().filter(CaExpiry::warn) {
            tracing::warn!(
                kind = ca.kind,
                fingerprint = %ca.fingerprint,
                subject = %ca.subject,
                days_left = (ca.seconds_left / 86400.0).floor() as i64,
                "{} expires within 30 days: rotate it (docs/trust-rotation.md)",
                ca.kind
            );
        }
        tokio::select! {
            c = issuer.changed() => if c.is_err() { return },
            c = bundle.changed() => if c.is_err() { return },
            _ = tokio::time::sleep(EXPIRY_CHECK_INTERVAL) => {}
        }
    }
}
