//! Keeps a workload certificate fresh: a key made in memory, a CSR, `Certify`
//! with the ServiceAccount token (re-read each time), renewal at about 70% of
//! the lifetime with jitter, backoff on failure while the current certificate
//! stays in use, and early re-certification when the identity service
//! announces a new issuer (spread over `renew_jitter`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use sidemesh_proto::identity::v1::{CertifyRequest, WatchIssuerRequest};
use tokio::sync::watch;

use crate::{SpiffeId, TrustStore, fingerprint};

/// A certificate held by a workload, with what the mesh reports about it.
#[derive(Debug)]
pub struct WorkloadCert {
    /// The identity it proves.
    pub id: SpiffeId,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Chain and signing key, ready for rustls.
    pub certified_key: Arc<CertifiedKey>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// SHA-256 of the issuing certificate.
    pub issuer_fingerprint: String,
    /// SHA-256 of the root the chain leads to.
    pub root_fingerprint: String,
}

/// Why one certification attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// The token file could not be read.
    #[error("reading token {path}: {source}")]
    Token {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The identity service refused or could not be reached.
    #[error("identity service: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The certificate returned is not usable.
    #[error("identity service returned an unusable certificate: {0}")]
    BadCertificate(String),
    /// Local crypto failure.
    #[error(transparent)]
    Csr(#[from] crate::csr::CsrError),
    /// The client could not be built.
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
}

/// Settings of a [`CertManager`].
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    /// Identity service `host:port`.
    pub identity_addr: String,
    /// SPIFFE ID the identity service must present.
    pub identity_server_id: SpiffeId,
    /// ServiceAccount token file, re-read on each renewal.
    pub token_path: PathBuf,
    /// The identity to request.
    pub workload_id: SpiffeId,
    /// Roots to verify the identity service and the issued chain against.
    pub trust: TrustStore,
    /// Spread of re-certifications after an issuer switch.
    pub renew_jitter: Duration,
}

/// Handle on the background task that keeps the certificate fresh.
#[derive(Debug, Clone)]
pub struct CertManager {
    rx: watch::Receiver<Option<Arc<WorkloadCert>>>,
}

/// Where in its lifetime a certificate is renewed (a random point in this range).
const RENEW_AT: std::ops::Range<f64> = 0.65..0.75;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl CertManager {
    /// Starts certifying in the background.
    pub fn spawn(config: CertManagerConfig) -> Self {
        let (tx, rx) = watch::channel(None);
        let tx = Arc::new(tx);
        let (renew_tx, renew_rx) = watch::channel(());
        tokio::spawn(watch_issuer(config.clone(), tx.clone(), renew_tx));
        tokio::spawn(run(config, tx, renew_rx));
        Self { rx }
    }

    /// The certificate in use, if one was obtained.
    pub fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.rx.borrow().clone()
    }

    /// Follows certificate changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<WorkloadCert>>> {
        self.rx.clone()
    }

    /// Waits for the first certificate.
    pub async fn ready(&self) -> Arc<WorkloadCert> {
        let mut rx = self.rx.clone();
        loop {
            if let Some(c) = rx.borrow_and_update().clone() {
                return c;
            }
            if rx.changed().await.is_err() {
                // The task never ends on its own; wait forever rather than lie.
                std::future::pending::<()>().await;
            }
        }
    }
}

async fn run(
    config: CertManagerConfig,
    tx: Arc<watch::Sender<Option<Arc<WorkloadCert>>>>,
    mut renew_now: watch::Receiver<()>,
) {
    let mut backoff = BACKOFF_MIN;
    renew_now.mark_unchanged();
    loop {
        let wait = match certify(&config).await {
            Ok(cert) => {
                backoff = BACKOFF_MIN;
                let at = renew_point(&cert);
                tracing::info!(
                    id = %cert.id,
                    issuer = %cert.issuer_fingerprint,
                    root = %cert.root_fingerprint,
                    valid_for_s = cert.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                    "workload certificate obtained"
                );
                tx.send_replace(Some(Arc::new(cert)));
                at.duration_since(SystemTime::now()).unwrap_or_default()
            }
            Err(e) => {
                // Never sleep past a good part of what the current certificate
                // has left, however long the backoff has grown.
                let left = tx
                    .borrow()
                    .as_ref()
                    .and_then(|c| c.not_after.duration_since(SystemTime::now()).ok())
                    .map(|d| d / 4);
                let capped = left.map_or(backoff, |l| backoff.min(l.max(BACKOFF_MIN)));
                let jittered = capped.mul_f64(jitter(0.5..1.0));
                tracing::warn!(error = %e, retry_in_ms = jittered.as_millis() as u64, "certification failed; the current certificate stays in use");
                backoff = (backoff * 2).min(BACKOFF_MAX);
                jittered
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = renew_now.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        if tx.is_closed() && tx.receiver_count() == 0 {
            return;
        }
    }
}

fn renew_point(cert: &WorkloadCert) -> SystemTime {
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap_or_default();
    cert.not_before + lifetime.mul_f64(jitter(RENEW_AT))
}

/// One certification: new key, CSR, Certify, checks on what came back.
pub async fn certify(config: &CertManagerConfig) -> Result<WorkloadCert, CertifyError> {
    let token = tokio::fs::read(&config.token_path)
        .await
        .map_err(|source| CertifyError::Token {
            path: config.token_path.display().to_string(),
            source,
        })?;
    let (key, csr) = crate::csr::generate(&config.workload_id)?;
    let mut client = crate::client::identity_client(
        &config.identity_addr,
        config.identity_server_id.clone(),
        config.trust.clone(),
    )?;
    let rsp = client
        .certify(CertifyRequest {
            identity: config.workload_id.to_string(),
            token,
            certificate_signing_request: csr,
        })
        .await?
        .into_inner();
    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    accept(
        &config.workload_id,
        &config.trust,
        rsp.leaf_certificate,
        rsp.intermediate_certificates,
        pkcs8,
    )
}

/// Checks an issued chain (chains to the bundle, names `id`, matches the key)
/// and packages it for rustls.
pub fn accept(
    id: &SpiffeId,
    trust: &TrustStore,
    leaf: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
    key: PrivateKeyDer<'static>,
) -> Result<WorkloadCert, CertifyError> {
    let bad = |m: String| CertifyError::BadCertificate(m);
    let leaf = CertificateDer::from(leaf);
    let intermediates: Vec<CertificateDer<'static>> = intermediates.into_iter().map(CertificateDer::from).collect();
    let bundle = trust.current();
    let root = crate::verify::verify_chain(
        &bundle,
        &leaf,
        &intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .map_err(|e| bad(format!("does not chain to the trust bundle: {e}")))?;
    let root_fingerprint = root.fingerprint.clone();
    let named = crate::verify::peer_id(&leaf).map_err(bad)?;
    if &named != id {
        return Err(bad(format!("names {named}, asked for {id}")));
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| bad(e.to_string()))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let not_before = at(parsed.validity().not_before.timestamp());
    let not_after = at(parsed.validity().not_after.timestamp());
    let issuer_fingerprint = intermediates
        .first()
        .map(|c| fingerprint(c))
        .unwrap_or_else(|| root_fingerprint.clone());
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(format!("key: {e}")))?;
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(leaf);
    chain.extend(intermediates);
    let certified_key = CertifiedKey::new(chain.clone(), signing_key);
    certified_key
        .keys_match()
        .map_err(|e| bad(format!("certificate is not for our key: {e}")))?;
    Ok(WorkloadCert {
        id: id.clone(),
        chain,
        certified_key: Arc::new(certified_key),
        not_before,
        not_after,
        issuer_fingerprint,
        root_fingerprint,
    })
}

/// Follows the identity service's current issuer; when it differs from the
/// issuer of the certificate held, asks for a renewal after a random delay
/// within `renew_jitter`, so that 10,000 proxies do not all call at once.
async fn watch_issuer(
    config: CertManagerConfig,
    certs: Arc<watch::Sender<Option<Arc<WorkloadCert>>>>,
    renew: watch::Sender<()>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let stream = async {
            let mut client = crate::client::identity_client(
                &config.identity_addr,
                config.identity_server_id.clone(),
                config.trust.clone(),
            )?;
            Ok::<_, CertifyError>(client.watch_issuer(WatchIssuerRequest {}).await?.into_inner())
        };
        match stream.await {
            Ok(mut stream) => {
                backoff = BACKOFF_MIN;
                loop {
                    match stream.message().await {
                        Ok(Some(state)) => {
                            let held = certs.borrow().as_ref().map(|c| c.issuer_fingerprint.clone());
                            if held.is_some_and(|h| h != state.issuer_fingerprint) {
                                let delay = config.renew_jitter.mul_f64(jitter(0.0..1.0));
                                tracing::info!(issuer = %state.issuer_fingerprint, delay_ms = delay.as_millis() as u64, "identity service switched issuer; re-certifying");
                                tokio::time::sleep(delay).await;
                                renew.send_replace(());
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "issuer stream ended");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "issuer stream"),
        }
        if renew.is_closed() {
            return;
        }
        tokio::time::sleep(backoff.mul_f64(jitter(0.5..1.0))).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A random factor in `range` (the thread RNG is not held across awaits).
fn jitter(range: std::ops::Range<f64>) -> f64 {
    rand::rng().random_range(range)
}
