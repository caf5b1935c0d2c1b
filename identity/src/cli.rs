//! The `sidemesh-identity` command line: flags, start-up, shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::issuer::IssuerFiles;
use crate::server::{self, Config};
use crate::token::TokenReviewer;
use anyhow::Context as _;
use clap::Parser;
use sidemesh_identity_client::SpiffeId;
use sidemesh_telemetry::admin::Admin;
use sidemesh_telemetry::flags::parse_duration;
use std::ffi::OsString;

/// The sidemesh identity service: issues short-lived SPIFFE workload
/// certificates against CSRs, authenticated by ServiceAccount tokens.
#[derive(Debug, Parser)]
#[command(name = "sidemesh-identity", version)]
pub struct Args {
    /// gRPC (TLS) listen address.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Trust domain of the identities it issues.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Its own SPIFFE ID [default: spiffe://<td>/ns/sidemesh-system/sa/sidemesh-identity].
    #[arg(long)]
    server_id: Option<String>,
    /// Lifetime of issued certificates (never past the issuer's own expiry).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    leaf_lifetime: Duration,
    /// How tokens are checked: `kubernetes` (TokenReview) or `file:<path>`.
    #[arg(long, default_value = "kubernetes")]
    token_reviewer: String,
    /// Issuer certificate (PEM; may be followed by its chain).
    #[arg(long, requires = "issuer_key", conflicts_with = "issuer_dir")]
    issuer_cert: Option<PathBuf>,
    /// Issuer private key (PEM, PKCS#8).
    #[arg(long, requires = "issuer_cert")]
    issuer_key: Option<PathBuf>,
    /// A directory with `tls.crt` and `tls.key` (a mounted cert-manager or kubernetes.io/tls Secret).
    #[arg(long)]
    issuer_dir: Option<PathBuf>,
    /// Trust bundle: PEM file of the trusted roots.
    #[arg(long)]
    trust_bundle: PathBuf,
    /// Admin endpoint (/metrics, /ready, /live), plain HTTP.
    #[arg(long, default_value = "0.0.0.0:9990")]
    admin_addr: SocketAddr,
    /// Runtime worker threads [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
    /// How long in-flight calls may take to finish after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
}

/// Parses `args` (the first is the program name) and runs the service.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = Args::parse_from(args);
    sidemesh_telemetry::runtime::main("sidemesh-identity", args.workers, || run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let server_id: SpiffeId = match &args.server_id {
        Some(id) => id.parse().context("--server-id")?,
        None => SpiffeId::new(&args.trust_domain, "sidemesh-system", "sidemesh-identity").context("--trust-domain")?,
    };
    let issuer = match (&args.issuer_dir, &args.issuer_cert, &args.issuer_key) {
        (Some(dir), _, _) => IssuerFiles::tls_dir(dir),
        (None, Some(cert), Some(key)) => IssuerFiles {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => {
            anyhow::bail!("an issuer is required: --issuer-cert and --issuer-key, or --issuer-dir")
        }
    };
    let reviewer = TokenReviewer::from_spec(&args.token_reviewer).await?;
    let metrics = sidemesh_telemetry::Metrics::new("sidemesh-identity")?;
    let instruments = crate::metrics::IdentityMetrics::new(&metrics.meter("sidemesh-identity"));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let config = Config {
        listen: args.listen,
        trust_domain: args.trust_domain.clone(),
        server_id: server_id.clone(),
        leaf_lifetime: args.leaf_lifetime,
        issuer,
        trust_bundle: args.trust_bundle.clone(),
    };
    let running = server::start(config, reviewer, instruments, stopped(stop_rx.clone())).await?;

    let admin = Admin::new(metrics);
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("listening on --admin-addr {}", args.admin_addr))?;
    admin.set_ready(true);
    tokio::spawn(admin.serve(admin_listener, stopped(stop_rx)));
    tracing::info!(listen = %running.local_addr, admin = %args.admin_addr, id = %server_id, "identity service ready");

    sidemesh_telemetry::shutdown::signal().await;
    let _ = stop_tx.send(true);
    if tokio::time::timeout(args.shutdown_grace, running.wait()).await.is_err() {
        tracing::warn!("grace period over; exiting with calls in flight");
    }
    Ok(())
}
