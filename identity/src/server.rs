//! Running the identity service: its own serving certificate (issued by its
//! issuer, renewed before expiry and on issuer change), TLS termination, the
//! gRPC server, and live reload of issuer and bundle files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sidemesh_identity_client::{SpiffeId, TrustStore};
use sidemesh_proto::identity::v1::identity_server::IdentityServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::issuer::{Issuer, IssuerError, IssuerFiles};
use crate::metrics::IdentityMetrics;
use crate::service::{Authority, control_plane_dns_names};
use crate::token::TokenReviewer;

/// Everything the identity service is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Trust domain it issues for.
    pub trust_domain: String,
    /// Its own SPIFFE ID.
    pub server_id: SpiffeId,
    /// Lifetime of issued leaves.
    pub leaf_lifetime: Duration,
    /// Issuer certificate and key.
    pub issuer: IssuerFiles,
    /// Trust bundle file.
    pub trust_bundle: PathBuf,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bundle unusable.
    #[error(transparent)]
    Bundle(#[from] sidemesh_identity_client::bundle::BundleError),
    /// Issuer unusable.
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    /// Could not bind.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Could not make the serving certificate.
    #[error("issuing the serving certificate: {0}")]
    ServingCert(String),
}

/// A started identity service.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub local_addr: SocketAddr,
    /// The current issuer.
    pub issuer: watch::Receiver<Arc<Issuer>>,
    /// The trust bundle it follows.
    pub trust: TrustStore,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits until the server has stopped (after the shutdown future resolved
    /// and in-flight calls drained).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// The serving certificate, swapped on renewal.
#[derive(Debug)]
struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|k| k.clone())
    }
}

fn serving_cert(
    issuer: &Issuer,
    id: &SpiffeId,
    lifetime: Duration,
) -> Result<(Arc<CertifiedKey>, SystemTime), StartError> {
    let err = |e: String| StartError::ServingCert(e);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| err(e.to_string()))?;
    let (leaf, not_after) = issuer
        .sign(id, &control_plane_dns_names(id), &key, lifetime)
        .map_err(|e| err(e.to_string()))?;
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .map_err(|e| err(e.to_string()))?;
    let mut chain = vec![leaf];
    chain.extend(issuer.chain().iter().cloned());
    Ok((Arc::new(CertifiedKey::new(chain, signing_key)), not_after))
}

/// Starts the service; it runs until `shutdown` resolves.
pub async fn start(
    config: Config,
    reviewer: TokenReviewer,
    metrics: IdentityMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Running, StartError> {
    sidemesh_identity_client::install_crypto_provider();
    let trust = TrustStore::watch_file(&config.trust_bundle)?;
    let issuer = Issuer::load(&config.issuer, &trust.current())?;
    tracing::info!(issuer = %issuer.subject(), fingerprint = %issuer.fingerprint(), root = %issuer.root_fingerprint(), "issuer loaded");
    let (cert, cert_expiry) = serving_cert(&issuer, &config.server_id, config.leaf_lifetime)?;
    let (issuer_tx, issuer_rx) = watch::channel(Arc::new(issuer));
    let issuer_tx = Arc::new(issuer_tx);
    metrics.watch_expiry(issuer_rx.clone(), trust.clone());
    watch_issuer_files(&config, trust.clone(), issuer_tx.clone(), metrics.clone());

    let serving = Arc::new(ServingCert(RwLock::new(cert)));
    tokio::spawn(renew_serving_cert(
        serving.clone(),
        issuer_rx.clone(),
        config.server_id.clone(),
        config.leaf_lifetime,
        cert_expiry,
    ));

    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| StartError::ServingCert(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    tls.alpn_protocols = vec![sidemesh_identity_client::tls::ALPN_H2.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let (stop_accepting_tx, stop_accepting) = watch::channel(false);
    let authority = Authority::new(
        &config.trust_domain,
        config.leaf_lifetime,
        reviewer,
        issuer_rx.clone(),
        metrics,
    )
    .with_shutdown(stop_accepting.clone());
    let incoming = tokio_stream::wrappers::ReceiverStream::new(sidemesh_identity_client::tls::incoming(
        listener,
        acceptor,
        stop_accepting,
    ));
    let task = tokio::spawn(async move {
        let shutdown = async move {
            shutdown.await;
            let _ = stop_accepting_tx.send(true);
        };
        let result = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(authority))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "identity server stopped");
        }
    });
    Ok(Running {
        local_addr,
        issuer: issuer_rx,
        trust,
        task,
    })
}

/// Reloads the issuer when its files (or the bundle) change; a refused issuer
/// leaves the previous one in service.
fn watch_issuer_files(
    config: &Config,
    trust: TrustStore,
    issuer: Arc<watch::Sender<Arc<Issuer>>>,
    metrics: IdentityMetrics,
) {
    let (kick_tx, mut kick_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for path in [&config.issuer.cert, &config.issuer.key] {
        let kick = kick_tx.clone();
        sidemesh_identity_client::watch::spawn(path.clone(), move |_| kick.send(()).is_ok());
    }
    let mut bundle_rx = trust.subscribe();
    let files = config.issuer.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                k = kick_rx.recv() => if k.is_none() { return },
                c = bundle_rx.changed() => if c.is_err() { return },
            }
            // Files of one Secret change together; let the burst settle.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while kick_rx.try_recv().is_ok() {}
            let bundle = trust.current();
            match Issuer::load(&files, &bundle) {
                Ok(new) if new.fingerprint() == issuer.borrow().fingerprint() => {}
                Ok(new) => {
                    tracing::info!(issuer = %new.subject(), fingerprint = %new.fingerprint(), root = %new.root_fingerprint(), "issuer switched");
                    metrics.reload(true);
                    issuer.send_replace(Arc::new(new));
                }
                Err(e) => {
                    metrics.reload(false);
                    tracing::warn!(error = %e, "issuer refused; the previous issuer stays in service");
                }
            }
        }
    });
}

async fn renew_serving_cert(
    serving: Arc<ServingCert>,
    mut issuer: watch::Receiver<Arc<Issuer>>,
    id: SpiffeId,
    lifetime: Duration,
    mut expiry: SystemTime,
) {
    loop {
        let now = SystemTime::now();
        let left = expiry.duration_since(now).unwrap_or_default();
        // Renew at 70% of the remaining lifetime, and at once on a new issuer.
        let wait = left.mul_f64(0.7).max(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = issuer.changed() => if changed.is_err() { return },
        }
        let current = issuer.borrow_and_update().clone();
        match serving_cert(&current, &id, lifetime) {
            Ok((cert, not_after)) => {
                if let Ok(mut slot) = serving.0.write() {
                    *slot = cert;
                }
                expiry = not_after;
                tracing::info!(issuer = %current.fingerprint(), "serving certificate renewed");
            }
            Err(e) => tracing::warn!(error = %e, "renewing the serving certificate"),
        }
    }
}
