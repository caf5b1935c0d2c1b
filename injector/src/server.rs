//! The HTTPS webhook: `POST /inject` with an AdmissionReview, TLS from PEM
//! files that are re-read when they change (a renewed Secret takes effect
//! without a restart), HTTP/1.1 and HTTP/2, graceful drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::inject::{InjectorConfig, NamespaceView};
use crate::metrics::InjectorMetrics;
use crate::namespaces::{Lookup, NamespaceCache};
use crate::review::{self, Review, StaticNamespaces, Verdict};

/// The largest review body accepted (the API server caps objects at ~3 MiB).
pub const MAX_BODY: usize = 8 << 20;

/// Where Namespace annotations come from.
#[derive(Debug, Clone)]
pub enum Namespaces {
    /// The reflector cache over the API server.
    Cache(Box<NamespaceCache>),
    /// A fixed set (tests and benchmarks without an API server).
    Static(Arc<StaticNamespaces>),
}

/// Everything the webhook is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// HTTPS listen address.
    pub listen: SocketAddr,
    /// Serving certificate chain (PEM).
    pub tls_cert: PathBuf,
    /// Serving key (PEM).
    pub tls_key: PathBuf,
    /// What to inject.
    pub injector: InjectorConfig,
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Could not bind.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why a certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The key does not fit the certificate, or rustls refused them.
    #[error("{cert} and {key}: {reason}")]
    Pair {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Loads a certificate chain and its key, checking that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let file_err = |path: &Path, reason: String| TlsError::File {
        path: path.to_owned(),
        reason,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| file_err(cert, e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(cert, "holds no CERTIFICATE block".into()));
    }
    let key_pem = std::fs::read(key).map_err(|e| file_err(key, e.to_string()))?;
    let key_der =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| file_err(key, format!("no usable private key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key_der, &provider)
        .map(Arc::new)
        .map_err(|e| TlsError::Pair {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        })
}

/// The serving certificate, swapped when its files change.
#[derive(Debug)]
struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|k| k.clone())
    }
}

/// Reloads the pair when either file changes; a bad pair (say, the
/// certificate written before its key) leaves the previous one in service.
fn watch_tls_files(cert: PathBuf, key: PathBuf, serving: Arc<ServingCert>, metrics: InjectorMetrics) {
    let (kick_tx, mut kick_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for path in [&cert, &key] {
        let kick = kick_tx.clone();
        sidemesh_identity_client::watch::spawn(path.clone(), move |_| kick.send(()).is_ok());
    }
    tokio::spawn(async move {
        while kick_rx.recv().await.is_some() {
            // The files of one Secret change together; let the burst settle.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while kick_rx.try_recv().is_ok() {}
            match load_certified_key(&cert, &key) {
                Ok(new) => {
                    if let Ok(mut slot) = serving.0.write() {
                        *slot = new;
                    }
                    metrics.reload(true);
                    tracing::info!(cert = %cert.display(), "serving certificate reloaded");
                }
                Err(e) => {
                    metrics.reload(false);
                    tracing::warn!(error = %e, "serving certificate refused; the previous one stays in service");
                }
            }
        }
    });
}

/// What every connection shares.
struct Shared {
    injector: InjectorConfig,
    namespaces: Namespaces,
    metrics: InjectorMetrics,
}

/// A started webhook.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits until the server has stopped (after shutdown and drain).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Starts the webhook; it stops accepting when `shutdown` resolves, then
/// finishes the reviews in flight.
pub async fn start(
    config: ServerConfig,
    namespaces: Namespaces,
    metrics: InjectorMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Running, StartError> {
    sidemesh_identity_client::install_crypto_provider();
    let cert = load_certified_key(&config.tls_cert, &config.tls_key)?;
    let serving = Arc::new(ServingCert(RwLock::new(cert)));
    watch_tls_files(
        config.tls_cert.clone(),
        config.tls_key.clone(),
        serving.clone(),
        metrics.clone(),
    );
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::File {
            path: config.tls_cert.clone(),
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
    let shared = Arc::new(Shared {
        injector: config.injector,
        namespaces,
        metrics,
    });
    let task = tokio::spawn(serve(listener, acceptor, shared, shutdown));
    Ok(Running { local_addr, task })
}

async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let (stop_accepting, stop) = tokio::sync::watch::channel(false);
    let mut conns = sidemesh_identity_client::tls::incoming(listener, acceptor, stop);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(Ok(tls)) = conns.recv() => {
                let shared = shared.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(tls), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "webhook connection");
                    }
                });
            }
        }
    }
    // The listener closes: new connections are refused while the drain runs.
    let _ = stop_accepting.send(true);
    drop(conns);
    graceful.shutdown().await;
    tracing::info!("webhook drained");
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    rsp
}

/// The largest announced body [`drain`] reads; a bigger one is refused unread.
const DRAIN_MAX: u64 = 64 << 20;
/// How long [`drain`] reads before the 413 goes out regardless.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads and drops a body announced as too large, within bounds, before the
/// 413 goes out: an HTTP/1 client still sending would otherwise meet a
/// connection closed under it and see a reset instead of the answer.
async fn drain(mut body: Incoming, announced: u64) {
    if announced > DRAIN_MAX {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIME, async { while let Some(Ok(_)) = body.frame().await {} }).await;
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    let mut body = message.into_bytes();
    body.push(b'\n');
    respond(status, "text/plain; charset=utf-8", body)
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => {}
        (_, "/inject") => return text(StatusCode::METHOD_NOT_ALLOWED, "use POST /inject".into()),
        (_, path) => {
            return text(
                StatusCode::NOT_FOUND,
                format!("no such path {path}; the webhook is POST /inject"),
            );
        }
    }
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY} bytes"),
        )
    };
    let announced = req.body().size_hint().lower();
    let body = if announced > MAX_BODY as u64 {
        drain(req.into_body(), announced).await;
        Err(too_large())
    } else {
        match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Err(e) => Err((StatusCode::BAD_REQUEST, format!("reading the body: {e}"))),
        }
    };
    let body = match body {
        Ok(b) => b,
        Err((status, message)) => {
            shared
                .metrics
                .admission("malformed", "unreadable-body", started.elapsed().as_secs_f64());
            return text(status, message);
        }
    };
    let review = match Review::parse(&body) {
        Ok(r) => r,
        Err(e) => {
            let elapsed = started.elapsed();
            shared
                .metrics
                .admission("malformed", "malformed-review", elapsed.as_secs_f64());
            tracing::warn!(error = %e, latency_us = elapsed.as_micros() as u64, "admission refused: malformed review");
            return text(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let namespace = review.namespace().unwrap_or_default().to_owned();
    let (response, verdict) = match &shared.namespaces {
        Namespaces::Static(s) => review::answer(&shared.injector, &review, s.view(&namespace)),
        Namespaces::Cache(cache) => {
            // Only Pod creations need the Namespace; skip the lookup otherwise.
            let lookup = if review.is_pod_create() {
                cache.get(&namespace).await
            } else {
                Lookup::Missing
            };
            let view = match &lookup {
                Lookup::Found(annotations) => NamespaceView::Known {
                    name: &namespace,
                    annotations,
                },
                Lookup::Missing => NamespaceView::Unknown(&namespace),
            };
            review::answer(&shared.injector, &review, view)
        }
    };
    let body = review::encode(response);
    let elapsed = started.elapsed();
    record(shared, &review, &verdict, elapsed);
    respond(StatusCode::OK, "application/json", body)
}

fn record(shared: &Shared, review: &Review, verdict: &Verdict, elapsed: Duration) {
    shared
        .metrics
        .admission(verdict.outcome, verdict.reason, elapsed.as_secs_f64());
    let uid = &review.request.uid;
    let namespace = review.namespace().unwrap_or_default();
    let pod = review.pod_name();
    let latency_us = elapsed.as_micros() as u64;
    match &verdict.message {
        Some(message) => tracing::info!(
            %uid, %namespace, %pod, outcome = verdict.outcome, reason = verdict.reason, latency_us, %message, "admission"
        ),
        None => {
            tracing::info!(%uid, %namespace, %pod, outcome = verdict.outcome, reason = verdict.reason, latency_us, "admission")
        }
    }
}
