//! `sidemesh check`: is the trust material sound, and do the proxies agree
//! with it?
//!
//! Offline it checks a bundle / issuer / leaf chain and how long each CA has
//! left. With proxy admin endpoints it reads each proxy's `/debug/state` and
//! says how many trust which roots and hold which chain ("N of M proxies on
//! the new chain"); with TLS endpoints (identity, destination) it looks at the
//! certificate chain each server presents. It exits 1 when a root or the
//! issuer expires within the threshold, when a chain does not verify, or when
//! a proxy disagrees with the bundle (or, without a bundle, with the others).
//!
//! With `--cluster` it reads the bundle ConfigMap of every namespace, the
//! issuer Secret and every injected Pod's `/debug/state` (through the API
//! server's Pod proxy) from the cluster of the kubeconfig.
//!
//! The observation helpers here are also what `sidemesh trust rotate` watches
//! between its steps.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};
use sidemesh_identity_client::verify::{KeyUsage, peer_id, verify_chain};
use sidemesh_identity_client::{TrustBundle, fingerprint};
use sidemesh_telemetry::flags::parse_duration;
use x509_parser::certificate::X509Certificate;

/// The proxy admin port, used when an endpoint names no port.
pub const ADMIN_PORT: u16 = 15020;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document, for scripts.
    Json,
}

/// Flags of `sidemesh check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Trust bundle (PEM roots); the proxies are compared with it.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Issuer certificate (PEM; may be followed by its chain).
    #[arg(long)]
    pub issuer: Option<PathBuf>,
    /// Issuer key (PEM PKCS#8), to check that it matches the issuer certificate.
    #[arg(long, requires = "issuer")]
    pub issuer_key: Option<PathBuf>,
    /// A workload certificate (PEM leaf, optionally followed by intermediates).
    #[arg(long)]
    pub leaf: Option<PathBuf>,
    /// Fail when a root or the issuer expires within this.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub threshold: Duration,
    /// Proxy admin endpoints (`http://10.0.0.5:15020`, `10.0.0.5:15020` or `10.0.0.5`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub proxies: Vec<String>,
    /// Control-plane TLS servers (`host:port`, e.g. the identity and destination services) whose served chain is checked.
    #[arg(long, value_delimiter = ',')]
    pub tls_endpoints: Vec<String>,
    /// Read the cluster (kubeconfig, or in-cluster): the bundle ConfigMap of every namespace, the issuer
    /// Secret, and every injected Pod's `/debug/state` through the API server's Pod proxy.
    #[arg(long)]
    pub cluster: bool,
    /// The control plane's namespace (with `--cluster`).
    #[arg(long, default_value = "sidemesh-system")]
    pub control_plane_namespace: String,
    /// Name of the trust-bundle ConfigMaps (with `--cluster`; key `ca-bundle.crt`).
    #[arg(long, default_value = "sidemesh-trust-bundle")]
    pub bundle_configmap: String,
    /// Name of the issuer Secret in the control plane's namespace (with `--cluster`).
    #[arg(long, default_value = "sidemesh-issuer")]
    pub issuer_secret: String,
    /// The proxies' admin port (with `--cluster`).
    #[arg(long, default_value_t = ADMIN_PORT)]
    pub admin_port: u16,
    /// Bound on each request to a proxy or server.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// What a proxy's `/debug/state` says about its identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyView {
    /// The admin endpoint asked.
    pub endpoint: String,
    /// Why it could not be read, if it could not.
    pub error: Option<String>,
    /// Its SPIFFE ID.
    pub identity: Option<String>,
    /// Fingerprint of its certificate's issuer.
    pub issuer: Option<String>,
    /// Fingerprint of the root its certificate chains to.
    pub root: Option<String>,
    /// End of its certificate's validity, Unix seconds.
    pub expiry_unix: Option<u64>,
    /// Fingerprints of the roots it trusts.
    pub trusted_roots: Vec<String>,
}

impl ProxyView {
    /// Whether it answered and holds a certificate.
    pub fn certified(&self) -> bool {
        self.error.is_none() && self.issuer.is_some()
    }

    /// Whether it trusts `root`.
    pub fn trusts(&self, root: &str) -> bool {
        self.error.is_none() && self.trusted_roots.iter().any(|r| r == root)
    }

    /// Whether it trusts exactly `roots`.
    pub fn trusts_exactly(&self, roots: &BTreeSet<String>) -> bool {
        self.error.is_none() && self.trusted_roots.iter().cloned().collect::<BTreeSet<_>>() == *roots
    }

    /// One line for people.
    pub fn line(&self) -> String {
        match &self.error {
            Some(e) => format!("{}: unreachable ({e})", self.endpoint),
            None => format!(
                "{}: {} cert issuer {} root {}, trusts [{}]",
                self.endpoint,
                self.identity.as_deref().unwrap_or("(no identity)"),
                short(self.issuer.as_deref()),
                short(self.root.as_deref()),
                self.trusted_roots
                    .iter()
                    .map(|r| short(Some(r)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn json(&self) -> Value {
        json!({
            "endpoint": self.endpoint,
            "error": self.error,
            "identity": self.identity,
            "issuer_fingerprint": self.issuer,
            "root_fingerprint": self.root,
            "expiry_unix": self.expiry_unix,
            "trusted_roots": self.trusted_roots,
        })
    }
}

/// The certificate chain a TLS server presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerView {
    /// `host:port`.
    pub endpoint: String,
    /// Why no chain was seen, if none was.
    pub error: Option<String>,
    /// The SPIFFE ID of its leaf.
    pub identity: Option<String>,
    /// Fingerprint of the certificate that issued its leaf (the first one sent after it).
    pub issuer: Option<String>,
    /// Fingerprint of the bundle root the chain verifies to, when it does.
    pub root: Option<String>,
    /// Why the chain does not verify against the bundle, when it does not.
    pub chain_error: Option<String>,
    /// End of the leaf's validity, Unix seconds.
    pub expiry_unix: Option<u64>,
}

impl ServerView {
    /// One line for people.
    pub fn line(&self) -> String {
        match (&self.error, &self.chain_error) {
            (Some(e), _) => format!("{}: no certificate seen ({e})", self.endpoint),
            (None, Some(e)) => format!(
                "{}: {} issuer {} does NOT verify against the bundle ({e})",
                self.endpoint,
                self.identity.as_deref().unwrap_or("(no SPIFFE ID)"),
                short(self.issuer.as_deref())
            ),
            (None, None) => format!(
                "{}: {} issuer {} root {}",
                self.endpoint,
                self.identity.as_deref().unwrap_or("(no SPIFFE ID)"),
                short(self.issuer.as_deref()),
                short(self.root.as_deref())
            ),
        }
    }

    fn json(&self) -> Value {
        json!({
            "endpoint": self.endpoint,
            "error": self.error,
            "identity": self.identity,
            "issuer_fingerprint": self.issuer,
            "root_fingerprint": self.root,
            "chain_error": self.chain_error,
            "expiry_unix": self.expiry_unix,
        })
    }
}

/// The first 16 hex digits of a fingerprint: enough for people to tell roots apart.
pub fn short(fp: Option<&str>) -> String {
    match fp {
        Some(f) => f.chars().take(16).collect(),
        None => "-".into(),
    }
}

/// `http://host:port/debug/state` for an admin endpoint given as a URL,
/// `host:port` or a bare host (port 15020).
pub fn state_url(endpoint: &str) -> anyhow::Result<http::Uri> {
    let e = endpoint.trim();
    let with_scheme = if e.contains("://") {
        e.to_owned()
    } else {
        format!("http://{e}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .with_context(|| format!("proxy endpoint {endpoint:?} is not a URL or host:port"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "proxy endpoint {endpoint:?}: the admin endpoint is plain http"
    );
    let authority = uri
        .authority()
        .with_context(|| format!("proxy endpoint {endpoint:?} names no host"))?;
    let port = authority.port_u16().unwrap_or(ADMIN_PORT);
    let host = authority.host();
    let url = format!("http://{host}:{port}/debug/state");
    url.parse()
        .with_context(|| format!("proxy endpoint {endpoint:?} is not a URL or host:port"))
}

fn parse_state(endpoint: &str, body: &[u8]) -> ProxyView {
    let mut view = ProxyView {
        endpoint: endpoint.to_owned(),
        ..ProxyView::default()
    };
    let doc: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            view.error = Some(format!("/debug/state is not JSON: {e}"));
            return view;
        }
    };
    let text = |v: &Value| v.as_str().map(str::to_owned);
    view.identity = text(&doc["identity"]);
    view.issuer = text(&doc["certificate"]["issuer_fingerprint"]);
    view.root = text(&doc["certificate"]["root_fingerprint"]);
    view.expiry_unix = doc["certificate"]["expiry_unix"].as_u64();
    view.trusted_roots = doc["trusted_roots"]
        .as_array()
        .map(|a| a.iter().filter_map(text).collect())
        .unwrap_or_default();
    view
}

/// An error and its sources on one line ("client error (Connect): tcp connect error: …").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Reads `/debug/state` of every proxy, concurrently, each bounded by `timeout`.
pub async fn observe_proxies(endpoints: &[String], timeout: Duration) -> Vec<ProxyView> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let asks = endpoints.iter().map(|endpoint| {
        let client = client.clone();
        async move {
            let failed = |error: String| ProxyView {
                endpoint: endpoint.clone(),
                error: Some(error),
                ..ProxyView::default()
            };
            let url = match state_url(endpoint) {
                Ok(u) => u,
                Err(e) => return failed(format!("{e:#}")),
            };
            let ask = async {
                let rsp = client.get(url).await.map_err(|e| error_chain(&e))?;
                let status = rsp.status();
                let body = rsp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
                if !status.is_success() {
                    return Err(format!("/debug/state answered {status}"));
                }
                Ok(body)
            };
            match tokio::time::timeout(timeout, ask).await {
                Ok(Ok(body)) => parse_state(endpoint, &body),
                Ok(Err(e)) => failed(e),
                Err(_) => failed(format!("no answer within {timeout:?}")),
            }
        }
    });
    futures::future::join_all(asks).await
}

/// The chain a server presented, as seen by a [`ChainRecorder`].
pub type SeenChain = Arc<Mutex<Option<Vec<CertificateDer<'static>>>>>;

/// A verifier that accepts any server and keeps the chain it presented: the
/// point is to see the chain, not to trust it (it is judged afterwards).
#[derive(Debug)]
pub struct ChainRecorder {
    seen: SeenChain,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ChainRecorder {
    /// A recorder storing into `seen`.
    pub fn new(seen: SeenChain) -> Self {
        Self {
            seen,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(chain);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// `host` of `host:port` as a TLS server name.
pub fn server_name(endpoint: &str) -> Result<ServerName<'static>, String> {
    let (host, _) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| format!("{endpoint:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    ServerName::try_from(host).map_err(|_| format!("{endpoint:?}: bad host name"))
}

/// The chain a TLS server at `endpoint` presents. Servers that require a
/// client certificate (the destination service) still send theirs first, so
/// the chain is seen even though the handshake then fails.
pub async fn server_chain(endpoint: &str, timeout: Duration) -> Result<Vec<CertificateDer<'static>>, String> {
    let seen = SeenChain::default();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainRecorder::new(seen.clone())))
        .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = server_name(endpoint)?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(endpoint)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        // The handshake's own outcome does not matter (see above).
        let _ = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(format!("no TLS handshake within {timeout:?}")),
    }
    let chain = seen.lock().map(|s| s.clone()).unwrap_or(None);
    chain.ok_or_else(|| "the server sent no certificate".to_owned())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn not_after(cert: &X509Certificate<'_>) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64)
}

/// Judges a presented chain against `bundle`.
pub fn judge_chain(endpoint: &str, chain: &[CertificateDer<'static>], bundle: Option<&TrustBundle>) -> ServerView {
    let mut view = ServerView {
        endpoint: endpoint.to_owned(),
        ..ServerView::default()
    };
    let Some((leaf, rest)) = chain.split_first() else {
        view.error = Some("empty chain".into());
        return view;
    };
    view.identity = peer_id(leaf).ok().map(|id| id.to_string());
    view.issuer = rest.first().map(|c| fingerprint(c));
    if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(leaf) {
        view.expiry_unix = Some(unix(not_after(&parsed)));
    }
    if let Some(bundle) = bundle {
        match verify_chain(bundle, leaf, rest, UnixTime::now(), KeyUsage::server_auth()) {
            Ok(root) => {
                view.root = Some(root.fingerprint.clone());
                if view.issuer.is_none() {
                    view.issuer = Some(root.fingerprint.clone());
                }
            }
            Err(e) => view.chain_error = Some(e.to_string()),
        }
    }
    view
}

/// Looks at the chain of every TLS endpoint, concurrently.
pub async fn observe_servers(endpoints: &[String], bundle: Option<&TrustBundle>, timeout: Duration) -> Vec<ServerView> {
    let asks = endpoints.iter().map(|e| async move {
        match server_chain(e, timeout).await {
            Ok(chain) => judge_chain(e, &chain, bundle),
            Err(error) => ServerView {
                endpoint: e.clone(),
                error: Some(error),
                ..ServerView::default()
            },
        }
    });
    futures::future::join_all(asks).await
}

/// PEM certificates of a file, in order.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut ders = Vec::new();
    for c in CertificateDer::pem_slice_iter(&text) {
        ders.push(c.with_context(|| format!("{}: not valid PEM", path.display()))?);
    }
    anyhow::ensure!(!ders.is_empty(), "{}: no CERTIFICATE block", path.display());
    Ok(ders)
}

fn parse(der: &[u8]) -> anyhow::Result<X509Certificate<'_>> {
    Ok(x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?
        .1)
}

/// The bundle root that signed (or is) the top of `chain`, following the
/// chain's own links first.
pub fn chain_root<'b>(
    chain: &[CertificateDer<'_>],
    bundle: &'b TrustBundle,
) -> Option<&'b sidemesh_identity_client::bundle::Root> {
    for der in chain {
        let fp = fingerprint(der);
        if let Some(root) = bundle.roots().iter().find(|r| r.fingerprint == fp) {
            return Some(root);
        }
        let cert = parse(der).ok()?;
        if let Some(root) = bundle.roots().iter().find(|r| {
            parse(&r.der).is_ok_and(|root| {
                root.subject() == cert.issuer() && cert.verify_signature(Some(root.public_key())).is_ok()
            })
        }) {
            return Some(root);
        }
    }
    None
}

fn days(seconds: i64) -> String {
    format!("{:.1} days", seconds as f64 / 86400.0)
}

fn seconds_left(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// The findings of one check run.
#[derive(Debug, Default)]
pub struct Report {
    /// What is wrong (exit status 1).
    pub problems: Vec<String>,
    /// Lines for people.
    pub text: String,
    /// The same, for scripts.
    pub json: serde_json::Map<String, Value>,
}

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        let _ = writeln!(self.text, "{}", s.as_ref());
    }

    fn problem(&mut self, s: String) {
        let _ = writeln!(self.text, "  PROBLEM: {s}");
        self.problems.push(s);
    }
}

fn check_bundle(report: &mut Report, source: &str, bundle: &TrustBundle, threshold: Duration) {
    report.line(format!("bundle {source}: {} root(s)", bundle.roots().len()));
    let mut roots = Vec::new();
    for root in bundle.roots() {
        let left = seconds_left(root.not_after);
        report.line(format!(
            "  root {} {} — expires in {}",
            short(Some(&root.fingerprint)),
            root.subject,
            days(left)
        ));
        let self_signed = parse(&root.der).is_ok_and(|c| c.subject() == c.issuer() && c.verify_signature(None).is_ok());
        if !self_signed {
            report.problem(format!(
                "bundle root {} ({}) is not self-signed; a bundle holds roots only",
                short(Some(&root.fingerprint)),
                root.subject
            ));
        }
        if left < threshold.as_secs() as i64 {
            report.problem(format!(
                "root {} ({}) expires in {} (threshold {}): rotate it (docs/trust-rotation.md)",
                short(Some(&root.fingerprint)),
                root.subject,
                days(left),
                days(threshold.as_secs() as i64)
            ));
        }
        roots.push(json!({
            "fingerprint": root.fingerprint,
            "subject": root.subject,
            "not_after_unix": unix(root.not_after),
            "expires_in_seconds": left,
        }));
    }
    report
        .json
        .insert("bundle".into(), json!({ "source": source, "roots": roots }));
}

/// The issuer as given: its certificate (and chain) and maybe its key, as PEM.
struct IssuerInput {
    source: String,
    cert_pem: Vec<u8>,
    key_pem: Option<Vec<u8>>,
}

fn check_issuer(
    report: &mut Report,
    input: &IssuerInput,
    bundle: Option<&TrustBundle>,
    threshold: Duration,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let source = &input.source;
    let mut chain = Vec::new();
    for c in CertificateDer::pem_slice_iter(&input.cert_pem) {
        chain.push(c.with_context(|| format!("issuer {source}: not valid PEM"))?);
    }
    anyhow::ensure!(!chain.is_empty(), "issuer {source}: no CERTIFICATE block");
    let cert = parse(&chain[0]).with_context(|| format!("issuer {source}"))?;
    let fp = fingerprint(&chain[0]);
    let left = seconds_left(not_after(&cert));
    report.line(format!(
        "issuer {source}: {} {} — expires in {}",
        short(Some(&fp)),
        cert.subject(),
        days(left)
    ));
    let is_ca = cert.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca);
    if !is_ca {
        report.problem(format!("issuer {} is not a CA certificate", cert.subject()));
    }
    if !cert.validity().is_valid() {
        report.problem(format!("issuer {} is not valid now", cert.subject()));
    } else if left < threshold.as_secs() as i64 {
        report.problem(format!(
            "issuer {} expires in {} (threshold {}): install a new issuer",
            cert.subject(),
            days(left),
            days(threshold.as_secs() as i64)
        ));
    }
    let mut root_fp = None;
    if let Some(bundle) = bundle {
        match chain_root(&chain, bundle) {
            Some(root) => {
                report.line(format!("  chains to bundle root {}", short(Some(&root.fingerprint))));
                root_fp = Some(root.fingerprint.clone());
            }
            None => report.problem(format!(
                "issuer {} does not chain to any root of the bundle",
                cert.subject()
            )),
        }
    }
    if let Some(key_pem) = &input.key_pem {
        let cert_pem = &input.cert_pem;
        // With a bundle, the identity service's own acceptance test; without
        // one, the key match alone.
        let checked = match bundle {
            Some(b) => sidemesh_identity::issuer::Issuer::from_pem(cert_pem, key_pem, b)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            None => rcgen::KeyPair::from_pem(&String::from_utf8_lossy(key_pem))
                .map_err(|e| e.to_string())
                .and_then(|k| {
                    if cert.public_key().subject_public_key.data.as_ref() == k.public_key_raw() {
                        Ok(())
                    } else {
                        Err("issuer key does not match the issuer certificate".into())
                    }
                }),
        };
        match checked {
            Ok(()) => report.line("  key matches; the identity service would accept it"),
            Err(e) => report.problem(format!("issuer refused: {e}")),
        }
    }
    report.json.insert(
        "issuer".into(),
        json!({
            "source": source,
            "fingerprint": fp,
            "subject": cert.subject().to_string(),
            "not_after_unix": unix(not_after(&cert)),
            "expires_in_seconds": left,
            "root_fingerprint": root_fp,
        }),
    );
    Ok(chain)
}

fn check_leaf(
    report: &mut Report,
    path: &Path,
    issuer_chain: &[CertificateDer<'static>],
    bundle: Option<&TrustBundle>,
) -> anyhow::Result<()> {
    let certs = read_certs(path)?;
    let (leaf, rest) = certs.split_first().context("no certificate")?;
    let cert = parse(leaf).with_context(|| path.display().to_string())?;
    let id = peer_id(leaf).ok().map(|i| i.to_string());
    let left = seconds_left(not_after(&cert));
    report.line(format!(
        "leaf {}: {} — expires in {}",
        path.display(),
        id.as_deref().unwrap_or("(no SPIFFE ID)"),
        days(left)
    ));
    if id.is_none() {
        report.problem("the leaf names no single SPIFFE ID (URI SAN)".into());
    }
    let mut intermediates: Vec<CertificateDer<'static>> = rest.to_vec();
    intermediates.extend(issuer_chain.iter().cloned());
    let mut root_fp = None;
    if let Some(bundle) = bundle {
        match verify_chain(bundle, leaf, &intermediates, UnixTime::now(), KeyUsage::client_auth()) {
            Ok(root) => {
                report.line(format!("  verifies to bundle root {}", short(Some(&root.fingerprint))));
                root_fp = Some(root.fingerprint.clone());
            }
            Err(e) => report.problem(format!("the leaf does not verify against the bundle: {e}")),
        }
    } else if left < 0 {
        report.problem("the leaf has expired".into());
    }
    report.json.insert(
        "leaf".into(),
        json!({
            "path": path,
            "identity": id,
            "fingerprint": fingerprint(leaf),
            "not_after_unix": unix(not_after(&cert)),
            "root_fingerprint": root_fp,
        }),
    );
    Ok(())
}

/// Summarises what the proxies trust and hold, against `bundle` (or, without
/// one, against each other), and the control-plane servers' chains.
pub fn judge_mesh(
    report: &mut Report,
    proxies: &[ProxyView],
    servers: &[ServerView],
    bundle: Option<&TrustBundle>,
    issuer: Option<&str>,
) {
    if !proxies.is_empty() {
        let reachable: Vec<&ProxyView> = proxies.iter().filter(|p| p.error.is_none()).collect();
        let m = proxies.len();
        report.line(format!("proxies: {} of {m} answered", reachable.len()));
        let mut trusted: BTreeMap<&str, usize> = BTreeMap::new();
        let mut chains: BTreeMap<(String, String), usize> = BTreeMap::new();
        for p in &reachable {
            for r in &p.trusted_roots {
                *trusted.entry(r.as_str()).or_default() += 1;
            }
            if p.certified() {
                let key = (p.issuer.clone().unwrap_or_default(), p.root.clone().unwrap_or_default());
                *chains.entry(key).or_default() += 1;
            }
        }
        for (root, n) in &trusted {
            let mark = match bundle {
                Some(b) if b.roots().iter().any(|r| r.fingerprint == *root) => " (in the bundle)",
                Some(_) => " (NOT in the bundle)",
                None => "",
            };
            report.line(format!("  {n} of {m} trust root {}{mark}", short(Some(root))));
        }
        for ((iss, root), n) in &chains {
            report.line(format!(
                "  {n} of {m} hold a certificate from issuer {} under root {}",
                short(Some(iss)),
                short(Some(root))
            ));
        }
        let expected: Option<BTreeSet<String>> = match bundle {
            Some(b) => Some(b.fingerprints().into_iter().collect()),
            // Without a bundle the proxies are compared with each other: the
            // set of roots most of them trust is "the" set.
            None => {
                let mut sets: BTreeMap<BTreeSet<String>, usize> = BTreeMap::new();
                for p in &reachable {
                    *sets.entry(p.trusted_roots.iter().cloned().collect()).or_default() += 1;
                }
                if sets.len() > 1 {
                    report.problem(format!("the proxies trust {} different sets of roots", sets.len()));
                }
                sets.into_iter().max_by_key(|(_, n)| *n).map(|(s, _)| s)
            }
        };
        let agree = |p: &ProxyView| {
            p.error.is_none()
                && p.certified()
                && expected.as_ref().is_none_or(|e| p.trusts_exactly(e))
                && match bundle {
                    Some(b) => p
                        .root
                        .as_ref()
                        .is_some_and(|r| b.roots().iter().any(|x| &x.fingerprint == r)),
                    None => true,
                }
                && issuer.is_none_or(|i| p.issuer.as_deref() == Some(i))
        };
        let agreeing = proxies.iter().filter(|p| agree(p)).count();
        match (bundle, issuer) {
            (Some(_), Some(i)) => report.line(format!(
                "  {agreeing} of {m} trust exactly the bundle's roots and hold a certificate from issuer {}",
                short(Some(i))
            )),
            (Some(_), None) => report.line(format!(
                "  {agreeing} of {m} trust exactly the bundle's roots and hold a certificate under one of them"
            )),
            _ => report.line(format!("  {agreeing} of {m} agree")),
        }
        for p in proxies {
            report.line(format!("  {}", p.line()));
        }
        for p in proxies {
            if let Some(e) = &p.error {
                report.problem(format!("proxy {}: {e}", p.endpoint));
            } else if !p.certified() {
                report.problem(format!("proxy {} holds no certificate", p.endpoint));
            } else if !agree(p) {
                let mut why = Vec::new();
                if let Some(e) = &expected
                    && !p.trusts_exactly(e)
                {
                    why.push(format!(
                        "trusts [{}], expected [{}]",
                        p.trusted_roots
                            .iter()
                            .map(|r| short(Some(r)))
                            .collect::<Vec<_>>()
                            .join(", "),
                        e.iter().map(|r| short(Some(r))).collect::<Vec<_>>().join(", ")
                    ));
                }
                if let Some(b) = bundle
                    && !p
                        .root
                        .as_ref()
                        .is_some_and(|r| b.roots().iter().any(|x| &x.fingerprint == r))
                {
                    why.push(format!(
                        "its certificate chains to root {}, not in the bundle",
                        short(p.root.as_deref())
                    ));
                }
                if let Some(i) = issuer
                    && p.issuer.as_deref() != Some(i)
                {
                    why.push(format!(
                        "its certificate is from issuer {}, not {}",
                        short(p.issuer.as_deref()),
                        short(Some(i))
                    ));
                }
                report.problem(format!("proxy {} disagrees: {}", p.endpoint, why.join("; ")));
            }
        }
        report.json.insert(
            "proxies".into(),
            json!({
                "total": m,
                "reachable": reachable.len(),
                "agreeing": agreeing,
                "trusted_roots": trusted,
                "chains": chains.iter().map(|((i, r), n)| json!({ "issuer_fingerprint": i, "root_fingerprint": r, "count": n })).collect::<Vec<_>>(),
                "each": proxies.iter().map(ProxyView::json).collect::<Vec<_>>(),
            }),
        );
    }
    if !servers.is_empty() {
        report.line(format!("TLS servers: {}", servers.len()));
        for s in servers {
            report.line(format!("  {}", s.line()));
        }
        for s in servers {
            if let Some(e) = &s.error {
                report.problem(format!("server {}: {e}", s.endpoint));
            } else if let Some(e) = &s.chain_error {
                report.problem(format!(
                    "server {} presents a chain the bundle does not verify: {e}",
                    s.endpoint
                ));
            } else if let Some(i) = issuer
                && s.issuer.as_deref() != Some(i)
            {
                report.problem(format!(
                    "server {} presents a certificate from issuer {}, not {}",
                    s.endpoint,
                    short(s.issuer.as_deref()),
                    short(Some(i))
                ));
            }
        }
        report.json.insert(
            "tls_endpoints".into(),
            Value::Array(servers.iter().map(ServerView::json).collect()),
        );
    }
}

/// Key of the PEM roots in the trust-bundle ConfigMaps.
pub const BUNDLE_KEY: &str = "ca-bundle.crt";

/// What `--cluster` read from the API server.
struct Cluster {
    client: kube::Client,
    /// Every trust-bundle ConfigMap: namespace and its `ca-bundle.crt`.
    bundles: Vec<(String, Option<String>)>,
    /// The issuer Secret's `tls.crt` and `tls.key`.
    issuer: Option<(Vec<u8>, Option<Vec<u8>>)>,
    /// Injected, running Pods: namespace and name.
    pods: Vec<(String, String)>,
}

async fn read_cluster(args: &CheckArgs) -> anyhow::Result<Cluster> {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{Api, ListParams};
    let client = kube::Client::try_default()
        .await
        .context("--cluster: no usable kubeconfig or in-cluster configuration")?;
    let maps: Api<ConfigMap> = Api::all(client.clone());
    let listed = maps
        .list(&ListParams::default().fields(&format!("metadata.name={}", args.bundle_configmap)))
        .await
        .with_context(|| format!("listing the {} ConfigMaps", args.bundle_configmap))?;
    let mut bundles: Vec<(String, Option<String>)> = listed
        .items
        .into_iter()
        .map(|cm| {
            let ns = cm.metadata.namespace.unwrap_or_default();
            let pem = cm.data.and_then(|mut d| d.remove(BUNDLE_KEY));
            (ns, pem)
        })
        .collect();
    bundles.sort();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.control_plane_namespace);
    let issuer = match secrets.get_opt(&args.issuer_secret).await {
        Ok(Some(secret)) => {
            let mut data = secret.data.unwrap_or_default();
            data.remove("tls.crt")
                .map(|c| (c.0, data.remove("tls.key").map(|k| k.0)))
        }
        Ok(None) => None,
        Err(e) => {
            // Reading Secrets is often not allowed; the rest still says a lot.
            tracing::warn!(error = %e, "reading the issuer Secret");
            None
        }
    };
    let meshed = meshed_pods(&client).await?;
    Ok(Cluster {
        client,
        bundles,
        issuer,
        pods: meshed,
    })
}

/// Running Pods annotated `sidemesh.io/injected`: namespace and name, sorted.
pub async fn meshed_pods(client: &kube::Client) -> anyhow::Result<Vec<(String, String)>> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams};
    let pods: Api<Pod> = Api::all(client.clone());
    let mut meshed = Vec::new();
    for pod in pods.list(&ListParams::default()).await.context("listing Pods")?.items {
        let injected = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("sidemesh.io/injected"));
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if injected && running {
            meshed.push((
                pod.metadata.namespace.unwrap_or_default(),
                pod.metadata.name.unwrap_or_default(),
            ));
        }
    }
    meshed.sort();
    Ok(meshed)
}

/// Reads each Pod's `/debug/state` through the API server's Pod proxy (the
/// operator's machine rarely reaches Pod IPs), 16 at a time.
pub async fn observe_pods(
    client: &kube::Client,
    pods: &[(String, String)],
    port: u16,
    timeout: Duration,
) -> Vec<ProxyView> {
    use futures::StreamExt as _;
    let asks = pods.iter().map(|(ns, name)| {
        let client = client.clone();
        async move {
            let endpoint = format!("{ns}/{name}");
            let failed = |error: String| ProxyView {
                endpoint: endpoint.clone(),
                error: Some(error),
                ..ProxyView::default()
            };
            let path = format!("/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy/debug/state");
            let request = match http::Request::get(path).body(Vec::new()) {
                Ok(r) => r,
                Err(e) => return failed(e.to_string()),
            };
            match tokio::time::timeout(timeout, client.request_text(request)).await {
                Ok(Ok(text)) => parse_state(&endpoint, text.as_bytes()),
                Ok(Err(e)) => failed(error_chain(&e)),
                Err(_) => failed(format!("no answer within {timeout:?}")),
            }
        }
    });
    futures::stream::iter(asks).buffered(16).collect().await
}

/// Every namespace's copy of the bundle must hold the same roots.
fn judge_distribution(report: &mut Report, cluster: &Cluster, reference: Option<&TrustBundle>) {
    let Some(reference) = reference else {
        return;
    };
    let want: BTreeSet<String> = reference.fingerprints().into_iter().collect();
    let mut same = 0;
    let mut each = Vec::new();
    for (ns, pem) in &cluster.bundles {
        let roots = pem
            .as_deref()
            .map(|p| TrustBundle::from_pem(p.as_bytes()).map(|b| b.fingerprints()));
        match &roots {
            Some(Ok(fps)) if fps.iter().cloned().collect::<BTreeSet<_>>() == want => same += 1,
            Some(Ok(fps)) => report.problem(format!(
                "namespace {ns}: its trust bundle holds [{}], not the bundle's [{}]",
                fps.iter().map(|r| short(Some(r))).collect::<Vec<_>>().join(", "),
                want.iter().map(|r| short(Some(r))).collect::<Vec<_>>().join(", ")
            )),
            Some(Err(e)) => report.problem(format!("namespace {ns}: its trust bundle is unusable: {e}")),
            None => report.problem(format!("namespace {ns}: its trust bundle has no {BUNDLE_KEY}")),
        }
        each.push(json!({
            "namespace": ns,
            "roots": roots.and_then(Result::ok),
        }));
    }
    report.line(format!(
        "trust-bundle ConfigMaps: {same} of {} namespaces hold the bundle's roots",
        cluster.bundles.len()
    ));
    report.json.insert(
        "configmaps".into(),
        json!({ "total": cluster.bundles.len(), "agreeing": same, "each": each }),
    );
}

/// Runs the checks; `Ok(false)` when a problem was found.
pub fn run(args: CheckArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.cluster
            || args.bundle.is_some()
            || args.issuer.is_some()
            || args.leaf.is_some()
            || !args.proxies.is_empty()
            || !args.tls_endpoints.is_empty(),
        "nothing to check: give --bundle, --issuer, --leaf, --proxies, --tls-endpoints or --cluster"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let cluster = if args.cluster {
        Some(rt.block_on(read_cluster(&args))?)
    } else {
        None
    };
    let mut report = Report::default();
    let cp_bundle = cluster.as_ref().and_then(|c| {
        c.bundles
            .iter()
            .find(|(ns, _)| *ns == args.control_plane_namespace)
            .and_then(|(_, pem)| pem.clone())
    });
    let bundle = match (&args.bundle, cp_bundle) {
        (Some(path), _) => {
            let b = TrustBundle::from_file(path).with_context(|| format!("--bundle {}", path.display()))?;
            check_bundle(&mut report, &path.display().to_string(), &b, args.threshold);
            Some(b)
        }
        (None, Some(pem)) => {
            let source = format!("configmap {}/{}", args.control_plane_namespace, args.bundle_configmap);
            let b = TrustBundle::from_pem(pem.as_bytes()).with_context(|| source.clone())?;
            check_bundle(&mut report, &source, &b, args.threshold);
            Some(b)
        }
        (None, None) => {
            if cluster.is_some() {
                report.problem(format!(
                    "no ConfigMap {}/{} with {BUNDLE_KEY}",
                    args.control_plane_namespace, args.bundle_configmap
                ));
            }
            None
        }
    };
    let issuer = match (&args.issuer, cluster.as_ref().and_then(|c| c.issuer.clone())) {
        (Some(path), _) => Some(IssuerInput {
            source: path.display().to_string(),
            cert_pem: std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            key_pem: args
                .issuer_key
                .as_ref()
                .map(|k| std::fs::read(k).with_context(|| format!("reading {}", k.display())))
                .transpose()?,
        }),
        (None, Some((cert_pem, key_pem))) => Some(IssuerInput {
            source: format!("secret {}/{}", args.control_plane_namespace, args.issuer_secret),
            cert_pem,
            key_pem,
        }),
        (None, None) => None,
    };
    let mut issuer_fp = None;
    let issuer_chain = match &issuer {
        Some(input) => {
            let chain = check_issuer(&mut report, input, bundle.as_ref(), args.threshold)?;
            issuer_fp = chain.first().map(|c| fingerprint(c));
            chain
        }
        None => Vec::new(),
    };
    if let Some(path) = &args.leaf {
        check_leaf(&mut report, path, &issuer_chain, bundle.as_ref())?;
    }
    if let Some(cluster) = &cluster {
        judge_distribution(&mut report, cluster, bundle.as_ref());
    }
    if !args.proxies.is_empty() || !args.tls_endpoints.is_empty() || cluster.is_some() {
        let (mut proxies, servers, in_cluster) = rt.block_on(async {
            let in_cluster = async {
                match &cluster {
                    Some(c) => observe_pods(&c.client, &c.pods, args.admin_port, args.timeout).await,
                    None => Vec::new(),
                }
            };
            tokio::join!(
                observe_proxies(&args.proxies, args.timeout),
                observe_servers(&args.tls_endpoints, bundle.as_ref(), args.timeout),
                in_cluster
            )
        });
        proxies.extend(in_cluster);
        judge_mesh(&mut report, &proxies, &servers, bundle.as_ref(), issuer_fp.as_deref());
    }
    let ok = report.problems.is_empty();
    match args.output {
        Output::Text => {
            print!("{}", report.text);
            if ok {
                println!("check: OK");
            } else {
                println!("check: {} problem(s)", report.problems.len());
            }
        }
        Output::Json => {
            report.json.insert("ok".into(), Value::Bool(ok));
            report.json.insert("problems".into(), json!(report.problems));
            println!(
                "{}",
                serde_json::to_string_pretty(&Value::Object(report.json)).unwrap_or_default()
            );
        }
    }
    Ok(ok)
}
