//! `sidemesh-injector`: the mutating admission webhook.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use sidemesh_injector::inject::InjectorConfig;
use sidemesh_injector::metrics::InjectorMetrics;
use sidemesh_injector::namespaces::NamespaceCache;
use sidemesh_injector::server::{self, Namespaces, ServerConfig};
use sidemesh_telemetry::admin::Admin;
use sidemesh_telemetry::flags::parse_duration;

/// The sidemesh injector: a mutating admission webhook (`POST /inject`) that
/// adds the sidemesh proxy and its iptables init step to Pods whose
/// annotation, or whose Namespace's annotation, `sidemesh.io/inject` is
/// `enabled`.
#[derive(Debug, Parser)]
#[command(name = "sidemesh-injector", version)]
struct Args {
    /// HTTPS listen address.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Serving certificate (PEM, may be followed by its chain); re-read when it changes.
    #[arg(long)]
    tls_cert: PathBuf,
    /// Serving key (PEM); re-read when it changes.
    #[arg(long)]
    tls_key: PathBuf,
    /// Image of the proxy and its init step.
    #[arg(long, default_value_t = sidemesh_injector::inject::default_proxy_image())]
    proxy_image: String,
    /// ConfigMap (in each Pod's namespace) holding the trust bundle under `ca-bundle.crt`.
    #[arg(long, default_value = "sidemesh-trust-bundle")]
    trust_bundle_configmap: String,
    /// Identity service address given to proxies.
    #[arg(long, default_value = "sidemesh-identity.sidemesh-system.svc:8443")]
    identity_addr: String,
    /// Destination service address given to proxies.
    #[arg(long, default_value = "sidemesh-destination.sidemesh-system.svc:8086")]
    destination_addr: String,
    /// Admin endpoint (/metrics, /ready, /live), plain HTTP.
    #[arg(long, default_value = "0.0.0.0:9995")]
    admin_addr: SocketAddr,
    /// Runtime worker threads [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
    /// How long reviews in flight may take to finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    sidemesh_telemetry::runtime::main("sidemesh-injector", args.workers, || run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    sidemesh_identity_client::install_crypto_provider();
    let metrics = sidemesh_telemetry::Metrics::new("sidemesh-injector")?;
    let instruments = InjectorMetrics::new(&metrics.meter("sidemesh-injector"));
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (kubeconfig or in-cluster configuration)")?;
    let cache = NamespaceCache::start(client);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let config = ServerConfig {
        listen: args.listen,
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        injector: InjectorConfig {
            proxy_image: args.proxy_image.clone(),
            trust_bundle_configmap: args.trust_bundle_configmap.clone(),
            identity_addr: args.identity_addr.clone(),
            destination_addr: args.destination_addr.clone(),
        },
    };
    let running = server::start(
        config,
        Namespaces::Cache(Box::new(cache.clone())),
        instruments,
        stopped(stop_rx.clone()),
    )
    .await
    .context("starting the webhook")?;

    let admin = Admin::new(metrics);
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("listening on --admin-addr {}", args.admin_addr))?;
    tokio::spawn(admin.clone().serve(admin_listener, stopped(stop_rx)));
    // Ready once the Namespace cache holds the first full list: before that
    // every Pod in an annotated Namespace would be let through uninjected.
    tokio::spawn(async move {
        if cache.wait_synced().await {
            admin.set_ready(true);
            tracing::info!(namespaces = cache.len(), "ready");
        }
    });
    tracing::info!(listen = %running.local_addr, admin = %args.admin_addr, image = %args.proxy_image, "injector started");

    sidemesh_telemetry::shutdown::signal().await;
    let _ = stop_tx.send(true);
    if tokio::time::timeout(args.shutdown_grace, running.wait()).await.is_err() {
        tracing::warn!("grace period over; exiting with reviews in flight");
    }
    Ok(())
}
