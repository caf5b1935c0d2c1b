//! The `sidemesh-destination` command line: flags, start-up, shutdown.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use crate::indexer::Indexer;
use crate::metrics::DestinationMetrics;
use crate::server::{self, stopped};
use crate::service::Discovery;
use crate::source::{self, SourceSpec};
use anyhow::Context as _;
use clap::Parser;
use sidemesh_identity_client::CertManager;
use sidemesh_identity_client::settings::IdentityArgs;
use sidemesh_telemetry::admin::Admin;
use sidemesh_telemetry::flags::parse_duration;
use std::ffi::OsString;
use tokio::sync::watch;

/// The sidemesh destination service: streams to proxies, over mutual TLS,
/// the endpoints and identities behind the addresses their applications
/// connect to.
#[derive(Debug, Parser)]
#[command(name = "sidemesh-destination", version)]
pub struct Args {
    /// gRPC (mTLS) listen address.
    #[arg(long, default_value = "0.0.0.0:8086")]
    listen: SocketAddr,
    /// Where objects come from: `kubernetes` (watch the API server) or `file:<path>` (multi-document YAML).
    #[arg(long, default_value = "kubernetes", value_parser = parse_source)]
    source: SourceSpec,
    /// Admin endpoint (/metrics, /ready, /live), plain HTTP.
    #[arg(long, default_value = "0.0.0.0:9996")]
    admin_addr: SocketAddr,
    /// Subscriptions one Discover stream may hold.
    #[arg(long, default_value = "4096", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_subscriptions: u32,
    /// Runtime worker threads [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
    /// How long streams and connections may take to close after SIGTERM.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    #[command(flatten)]
    identity: IdentityArgs,
}

fn parse_source(s: &str) -> Result<SourceSpec, String> {
    s.parse().map_err(|e: source::SourceError| e.to_string())
}

/// Parses `args` (the first is the program name) and runs the service.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = Args::parse_from(args);
    sidemesh_telemetry::runtime::main("sidemesh-destination", args.workers, || run(args))
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    sidemesh_identity_client::install_crypto_provider();
    let td = args.identity.trust_domain.clone();
    let default_id = crate::default_server_id(&td).context("SIDEMESH_TRUST_DOMAIN")?;
    // Without an explicit identity or Pod downward-API settings, be the
    // identity proxies expect of the destination service.
    let unset = |v: &Option<String>| v.as_deref().is_none_or(str::is_empty);
    if unset(&args.identity.workload_id)
        && (unset(&args.identity.pod_namespace) || unset(&args.identity.pod_service_account))
    {
        args.identity.workload_id = Some(default_id.to_string());
    }
    let trust = args.identity.trust_store()?;
    let cert_config = args.identity.cert_manager_config(trust.clone())?;
    let id = cert_config.workload_id.clone();

    let metrics = sidemesh_telemetry::Metrics::new("sidemesh-destination")?;
    let instruments = DestinationMetrics::new(&metrics.meter("sidemesh-destination"));
    let (indexer, feed) = Indexer::spawn(&td, instruments.clone(), args.source.name());
    match &args.source {
        SourceSpec::File(path) => source::file::start(path.clone(), feed).await?,
        SourceSpec::Kubernetes => source::kubernetes::start(source::kubernetes::client().await?, feed),
    }

    let certs = CertManager::spawn(cert_config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let discovery = Discovery::new(
        indexer.clone(),
        instruments,
        args.max_subscriptions as usize,
        stop_rx.clone(),
    );
    let tls = server::tls_config(certs.subscribe(), trust).context("--listen")?;
    let running = server::start(args.listen, tls, discovery, stop_rx.clone()).await?;

    let admin = Admin::new(metrics);
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("listening on --admin-addr {}", args.admin_addr))?;
    tokio::spawn(admin.clone().serve(admin_listener, {
        let mut stop = stop_rx.clone();
        async move { stopped(&mut stop).await }
    }));
    tokio::spawn(readiness(admin, certs, indexer, stop_rx));
    tracing::info!(listen = %running.local_addr, admin = %args.admin_addr, %id, source = args.source.name(), "destination service started; ready once certified and synced");

    sidemesh_telemetry::shutdown::signal().await;
    let _ = stop_tx.send(true);
    if tokio::time::timeout(args.shutdown_grace, running.wait()).await.is_err() {
        tracing::warn!("grace period over; exiting with streams still open");
    }
    Ok(())
}

/// Ready while a certificate is held and the source has synced; not ready
/// once shutting down, so traffic moves to other replicas first.
async fn readiness(admin: Admin, certs: CertManager, indexer: Indexer, mut stop: watch::Receiver<bool>) {
    let mut cert_rx = certs.subscribe();
    let mut synced_rx = indexer.synced();
    let mut was = false;
    loop {
        let ready = cert_rx.borrow_and_update().is_some() && *synced_rx.borrow_and_update() && !*stop.borrow();
        if ready != was {
            tracing::info!(ready, "readiness changed");
            was = ready;
        }
        admin.set_ready(ready);
        tokio::select! {
            c = cert_rx.changed() => if c.is_err() { return },
            s = synced_rx.changed() => if s.is_err() { return },
            s = stop.changed() => if s.is_err() { return },
        }
    }
}
