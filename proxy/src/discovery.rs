//! The discovery client: one gRPC stream to the destination service over
//! mTLS, multiplexing a subscription per original destination, and a cache
//! that keeps serving the last known state when the stream drops. Without a
//! destination service every target resolves to [`Resolution::Unknown`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sidemesh_proto::destination::v1::destination_client::DestinationClient;
use sidemesh_proto::destination::v1::{
    self as pb, DiscoveryRequest, DiscoveryResponse, discovery_request, discovery_response,
};
use tokio::sync::{mpsc, watch};

use crate::endpoint::Endpoint;
use crate::policy::ServicePolicy;
use crate::retry::Budget;

/// What an original destination is, as far as the mesh knows.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// Not known (yet, or at all): forward to the original destination.
    Unknown,
    /// A Service's ClusterIP:port, with its compiled traffic policy.
    Service(Arc<ServicePolicy>),
    /// A Pod's IP:port.
    Pod(Arc<Endpoint>),
}

impl PartialEq for Resolution {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Unknown, Self::Unknown) => true,
            (Self::Service(a), Self::Service(b)) => a.service == b.service,
            (Self::Pod(a), Self::Pod(b)) => a == b,
            _ => false,
        }
    }
}

/// How long a new target waits for its first answer before it is treated
/// as unknown (and forwarded as-is).
pub const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The discovery cache.
#[derive(Clone, Debug)]
pub struct Discovery {
    inner: Option<Arc<Inner>>,
}

/// One followed destination.
#[derive(Debug)]
struct Target {
    tx: watch::Sender<Option<Resolution>>,
    /// When a connection last asked for it.
    used: Instant,
}

#[derive(Debug)]
struct Inner {
    targets: Mutex<HashMap<SocketAddr, Target>>,
    requests: mpsc::UnboundedSender<SocketAddr>,
    connected: watch::Sender<bool>,
    // Budgets outlive updates of their Service, or every update would refill them.
    budgets: Mutex<HashMap<String, Arc<Budget>>>,
}

impl Discovery {
    /// No destination service: everything is unknown.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Follows the destination service on `channel` (a lazily connected mTLS
    /// channel) once `ready` resolves (the workload certificate is held:
    /// connecting before would only be refused).
    /// Destinations idle for `idle` (no connection follows them, none asked)
    /// are forgotten and unsubscribed, so that a proxy that meets many
    /// destinations over its life (external IPs, Pods come and gone) keeps
    /// to what it uses and under the service's per-stream limit.
    pub fn spawn(
        channel: tonic::transport::Channel,
        ready: impl std::future::Future<Output = ()> + Send + 'static,
        idle: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            targets: Mutex::default(),
            requests: tx,
            connected: watch::Sender::new(false),
            budgets: Mutex::default(),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            ready.await;
            run(weak, DestinationClient::new(channel), rx, idle).await;
        });
        Self { inner: Some(inner) }
    }

    /// Whether a destination service is configured.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// How many original destinations are followed.
    pub fn targets(&self) -> usize {
        self.inner
            .as_ref()
            .and_then(|i| i.targets.lock().ok().map(|t| t.len()))
            .unwrap_or(0)
    }

    /// Whether the stream to the destination service is up.
    pub fn connected(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| *i.connected.borrow())
    }

    /// Follows `target`; the receiver holds `None` until the first answer.
    pub fn subscribe(&self, target: SocketAddr) -> watch::Receiver<Option<Resolution>> {
        let Some(inner) = &self.inner else {
            return watch::Sender::new(Some(Resolution::Unknown)).subscribe();
        };
        let Ok(mut targets) = inner.targets.lock() else {
            return watch::Sender::new(Some(Resolution::Unknown)).subscribe();
        };
        let now = Instant::now();
        if let Some(t) = targets.get_mut(&target) {
            t.used = now;
            return t.tx.subscribe();
        }
        let tx = watch::Sender::new(None);
        let rx = tx.subscribe();
        targets.insert(target, Target { tx, used: now });
        let _ = inner.requests.send(target);
        rx
    }

    /// The current resolution of `target`, waiting a bounded time for a first answer.
    pub async fn resolve(&self, target: SocketAddr) -> Resolution {
        let mut rx = self.subscribe(target);
        let first = tokio::time::timeout(FIRST_ANSWER_TIMEOUT, rx.wait_for(|r| r.is_some())).await;
        match first {
            Ok(Ok(r)) => r.clone().unwrap_or(Resolution::Unknown),
            _ => {
                tracing::debug!(%target, "no answer from discovery in time; forwarding as unknown");
                Resolution::Unknown
            }
        }
    }

    /// Snapshot of every known target, for `/debug/state`.
    pub fn snapshot(&self) -> Vec<(SocketAddr, Option<Resolution>)> {
        let Some(inner) = &self.inner else { return Vec::new() };
        let Ok(targets) = inner.targets.lock() else {
            return Vec::new();
        };
        let mut all: Vec<_> = targets.iter().map(|(k, v)| (*k, v.tx.borrow().clone())).collect();
        all.sort_by_key(|(k, _)| *k);
        all
    }
}

/// The Service's budget: kept across updates unless its ratio changed.
fn budget_for(inner: &Inner, svc: &pb::Service) -> Arc<Budget> {
    let (ratio, min, window) = match &svc.retry_budget {
        Some(b) => (
            b.ratio as f32,
            b.min_retries_per_second,
            b.window
                .as_ref()
                .and_then(|w| {
                    Some(Duration::new(
                        u64::try_from(w.seconds).ok()?,
                        u32::try_from(w.nanos).ok()?,
                    ))
                })
                .unwrap_or(Duration::from_secs(10)),
        ),
        None => (0.2, 10, Duration::from_secs(10)),
    };
    let key = format!("{}/{}", svc.namespace, svc.name);
    let mut budgets = inner.budgets.lock().unwrap_or_else(|p| p.into_inner());
    match budgets.get(&key) {
        Some(b) if (b.ratio - ratio).abs() < f32::EPSILON => b.clone(),
        _ => {
            let b = Arc::new(Budget::new(ratio, min, window));
            budgets.insert(key, b.clone());
            b
        }
    }
}

fn apply(inner: &Inner, rsp: DiscoveryResponse) {
    let Ok(target) = rsp.target.parse::<SocketAddr>() else {
        tracing::debug!(target = %rsp.target, "discovery answer for an unparseable target ignored");
        return;
    };
    // Cloned out (an Arc) so that compiling does not hold the targets' lock.
    let Some(previous) = inner
        .targets
        .lock()
        .ok()
        .and_then(|t| Some(t.get(&target)?.tx.borrow().clone()))
    else {
        return; // no longer followed
    };
    let resolution = match rsp.result {
        Some(discovery_response::Result::Service(s)) => {
            let budget = budget_for(inner, &s);
            let policy = ServicePolicy::compile(s, budget);
            policy.warn_new_problems(match &previous {
                Some(Resolution::Service(p)) => Some(p),
                _ => None,
            });
            Resolution::Service(Arc::new(policy))
        }
        Some(discovery_response::Result::Pod(p)) => {
            let pod = Endpoint::from(p);
            if !matches!(&previous, Some(Resolution::Pod(old)) if old.raw == pod.raw) {
                pod.warn_if_unusable();
            }
            Resolution::Pod(Arc::new(pod))
        }
        Some(discovery_response::Result::Unknown(_)) | None => Resolution::Unknown,
    };
    if let Ok(targets) = inner.targets.lock()
        && let Some(Target { tx, .. }) = targets.get(&target)
    {
        tx.send_if_modified(|cur| {
            if cur.as_ref() == Some(&resolution) {
                false
            } else {
                *cur = Some(resolution);
                true
            }
        });
    }
}

/// Forgets the targets that no connection follows (no receiver) and that
/// nobody asked for within `idle`; returns them.
fn evict_idle(inner: &Inner, idle: Duration) -> Vec<SocketAddr> {
    let now = Instant::now();
    let mut gone = Vec::new();
    let mut targets = inner.targets.lock().unwrap_or_else(|p| p.into_inner());
    targets.retain(|addr, t| {
        let keep = t.tx.receiver_count() > 0 || now.duration_since(t.used) < idle;
        if !keep {
            gone.push(*addr);
        }
        keep
    });
    gone
}

async fn run(
    inner: std::sync::Weak<Inner>,
    mut client: DestinationClient<tonic::transport::Channel>,
    mut new_targets: mpsc::UnboundedReceiver<SocketAddr>,
    idle: Duration,
) {
    let mut backoff = Duration::from_millis(200);
    let mut sweep = tokio::time::interval((idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(30)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(strong) = inner.upgrade() else { return };
        evict_idle(&strong, idle);
        // Every known target is (re)subscribed on each new stream.
        let known: Vec<SocketAddr> = strong
            .targets
            .lock()
            .map(|t| t.keys().copied().collect())
            .unwrap_or_default();
        drop(strong);
        let (req_tx, req_rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
        let subscribe = |t: SocketAddr| DiscoveryRequest {
            request: Some(discovery_request::Request::Subscribe(t.to_string())),
        };
        let unsubscribe = |t: SocketAddr| DiscoveryRequest {
            request: Some(discovery_request::Request::Unsubscribe(t.to_string())),
        };
        for t in known {
            let _ = req_tx.send(subscribe(t));
        }
        let outbound = tokio_stream_from(req_rx);
        match client.discover(outbound).await {
            Ok(rsp) => {
                let mut stream = rsp.into_inner();
                if let Some(i) = inner.upgrade() {
                    i.connected.send_replace(true);
                }
                backoff = Duration::from_millis(200);
                loop {
                    tokio::select! {
                        t = new_targets.recv() => match t {
                            Some(t) => { let _ = req_tx.send(subscribe(t)); }
                            None => return,
                        },
                        _ = sweep.tick() => {
                            let Some(i) = inner.upgrade() else { return };
                            // Sent in this task, so before any later subscribe of the same target.
                            for t in evict_idle(&i, idle) {
                                tracing::debug!(target = %t, "idle destination forgotten");
                                let _ = req_tx.send(unsubscribe(t));
                            }
                        },
                        msg = stream.message() => match msg {
                            Ok(Some(rsp)) => {
                                let Some(i) = inner.upgrade() else { return };
                                apply(&i, rsp);
                            }
                            Ok(None) => { tracing::info!("discovery stream ended; reconnecting"); break; }
                            Err(e) => { tracing::warn!(error = %e, "discovery stream failed; serving the last known state"); break; }
                        },
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reach the destination service; serving the last known state"),
        }
        if let Some(i) = inner.upgrade() {
            i.connected.send_replace(false);
        }
        // Targets that arrived while disconnected are in the map already and
        // get subscribed with the rest on the next stream.
        while new_targets.try_recv().is_ok() {}
        let jitter: f64 = rand::random_range(0.5..1.0);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// An unbounded receiver as a `Stream` (tokio-stream's wrapper, without the dependency).
fn tokio_stream_from(
    mut rx: mpsc::UnboundedReceiver<DiscoveryRequest>,
) -> impl futures::Stream<Item = DiscoveryRequest> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
