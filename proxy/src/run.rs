//! `sidemesh-proxy run`: start-up, listeners, readiness, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use sidemesh_identity_client::tls::CurrentCert;
use sidemesh_identity_client::{CertManager, SpiffeId};
use sidemesh_telemetry::admin::Admin;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::{ProxyArgs, TelemetryMode};
use crate::discovery::Discovery;
use crate::drain::Drain;
use crate::plain::PlainClients;
use crate::pool::MeshPool;
use crate::telemetry::{Direction, ProxyTelemetry};
use crate::tls::MeshTls;
use crate::{Proxy, inbound, outbound};

/// Backlog of the data-plane listeners: the default 128 overflows under
/// connection-per-request load.
const BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts on `listener` until draining starts; each connection runs
/// `handle` on its own task, counted and held open against the drain.
async fn accept<F, Fut>(proxy: Arc<Proxy>, listener: TcpListener, direction: Direction, handle: F)
where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = proxy.drain.signaled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, direction = direction.as_str(), "accept");
                continue;
            }
        };
        let guard = proxy.drain.guard();
        let conn = proxy.telemetry.conn_opened(direction);
        let handled = handle(proxy.clone(), stream, peer);
        tokio::spawn(async move {
            let _guard = guard;
            let _conn = conn;
            if let Err(e) = handled.await {
                tracing::debug!(%peer, error = %e, direction = direction.as_str(), "connection");
            }
        });
    }
}

/// Runs the sidecar until SIGTERM (or `POST /shutdown`) and the drain.
pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    // One worker (the default): a current-thread runtime, cheapest for a
    // sidecar, and it batches writes of requests finished together.
    let rt = sidemesh_telemetry::runtime::build(Some(args.workers)).context("starting the runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: ProxyArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    sidemesh_identity_client::install_crypto_provider();
    let idle = (!args.metrics_idle_expiry.is_zero()).then_some(args.metrics_idle_expiry);
    let metrics = sidemesh_telemetry::Metrics::builder("sidemesh-proxy")
        .idle_expiry(idle)
        .build()?;

    // Identity: without an identity service the proxy forwards plaintext only.
    let has_identity = args.identity.identity_addr.as_deref().is_some_and(|a| !a.is_empty());
    let (certs, trust, tls) = if has_identity {
        let trust = args.identity.trust_store()?;
        let config = args.identity.cert_manager_config(trust.clone())?;
        let certs = CertManager::spawn(config);
        let tls = MeshTls::new(CurrentCert::new(certs.subscribe()), trust.clone()).context("mesh TLS")?;
        (Some(certs), Some(trust), Some(Arc::new(tls)))
    } else {
        tracing::warn!("no SIDEMESH_IDENTITY_ADDR: running without mTLS (plaintext only)");
        (None, None, None)
    };

    crate::identity_metrics::register(&metrics.meter("sidemesh-proxy"), certs.as_ref(), trust.as_ref());
    let telemetry = Arc::new(match args.telemetry {
        TelemetryMode::Off => {
            tracing::info!("SIDEMESH_TELEMETRY=off: no data-plane metrics or spans");
            ProxyTelemetry::off()
        }
        TelemetryMode::On => {
            let identity = if has_identity {
                args.identity.workload_id()?.to_string()
            } else {
                String::new()
            };
            ProxyTelemetry::new(
                &metrics.meter("sidemesh-proxy"),
                &identity,
                sidemesh_telemetry::Traces::from_env("sidemesh-proxy")?,
            )
        }
    });

    let discovery = match args.destination_addr.as_deref().filter(|a| !a.is_empty()) {
        None => Discovery::disabled(),
        Some(addr) => {
            let (Some(certs), Some(trust)) = (&certs, &trust) else {
                anyhow::bail!(
                    "SIDEMESH_DESTINATION_ADDR needs an identity (SIDEMESH_IDENTITY_ADDR) to reach the destination service over mTLS"
                );
            };
            let server_id: SpiffeId = match args.destination_server_id.as_deref().filter(|s| !s.is_empty()) {
                Some(id) => id.parse().context("SIDEMESH_DESTINATION_SERVER_ID")?,
                None => SpiffeId::new(&args.identity.trust_domain, "sidemesh-system", "sidemesh-destination")
                    .context("SIDEMESH_TRUST_DOMAIN")?,
            };
            let channel = sidemesh_identity_client::client::mtls_channel(
                addr,
                server_id,
                trust.clone(),
                CurrentCert::new(certs.subscribe()),
            )
            .context("SIDEMESH_DESTINATION_ADDR")?;
            let certs = certs.clone();
            Discovery::spawn(
                channel,
                async move {
                    certs.ready().await;
                },
                args.discovery_idle_timeout,
            )
        }
    };

    let outbound_listener =
        listen(args.outbound_addr).with_context(|| format!("listening on {}", args.outbound_addr))?;
    let inbound_listener = listen(args.inbound_addr).with_context(|| format!("listening on {}", args.inbound_addr))?;
    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("listening on {}", args.admin_addr))?;

    telemetry.register_discovery(&metrics.meter("sidemesh-proxy"), discovery.clone());
    let proxy = Arc::new(Proxy {
        pool: tls.map(|tls| MeshPool::new(tls, telemetry.clone())),
        plain: PlainClients::new(),
        balancer: crate::balance::Balancer::default(),
        discovery,
        certs: certs.clone(),
        trust,
        opaque_ports: args.opaque_port_set(),
        app_ip: args.app_addr.ip,
        app_port: args.app_addr.port,
        inbound_policy: args.inbound_policy,
        detect_timeout: args.detect_timeout,
        drain: Drain::new(),
        telemetry,
    });

    if proxy.pool.is_some() && !args.mesh_idle_timeout.is_zero() {
        let weak = Arc::downgrade(&proxy);
        let period = args.mesh_idle_timeout;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(proxy) = weak.upgrade() else { break };
                if let Some(pool) = &proxy.pool {
                    pool.close_idle();
                }
            }
        });
    }

    let admin = Admin::new(metrics.clone()).with_routes(crate::admin::routes(proxy.clone()));
    let admin_drain = proxy.drain.clone();
    let (admin_stop_tx, mut admin_stop) = tokio::sync::watch::channel(false);
    tokio::spawn(admin.clone().serve(admin_listener, async move {
        let _ = admin_stop.wait_for(|s| *s).await;
    }));
    tokio::spawn(accept(
        proxy.clone(),
        outbound_listener,
        Direction::Outbound,
        outbound::handle,
    ));
    tokio::spawn(accept(
        proxy.clone(),
        inbound_listener,
        Direction::Inbound,
        inbound::handle,
    ));

    // Ready once listening and, with an identity, holding a certificate.
    let ready_admin = admin.clone();
    let ready_certs: Option<CertManager> = certs;
    tokio::spawn(async move {
        if let Some(certs) = ready_certs {
            certs.ready().await;
        }
        ready_admin.set_ready(true);
        tracing::info!(ms = started.elapsed().as_millis() as u64, "proxy ready");
    });

    tokio::select! {
        _ = sidemesh_telemetry::shutdown::signal() => proxy.drain.start(),
        _ = admin_drain.signaled() => {}
    }
    admin.set_ready(false);
    tracing::info!(active = proxy.drain.active(), grace = ?args.shutdown_grace, "draining");
    if tokio::time::timeout(args.shutdown_grace, proxy.drain.idle())
        .await
        .is_err()
    {
        tracing::warn!(
            active = proxy.drain.active(),
            "grace period over; exiting with connections open"
        );
    }
    let _ = admin_stop_tx.send(true);
    // What was recorded up to the end leaves over OTLP (when configured).
    proxy.telemetry.shutdown().await;
    metrics.shutdown().await;
    Ok(())
}
