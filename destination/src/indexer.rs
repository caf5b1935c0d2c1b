//! The running index: one task applies the changes sources send (in batches:
//! a relist or a burst of watch events costs one pass), then recomputes every
//! subscribed address once and publishes the ones whose state changed.
//!
//! Each subscribed address has one `watch` channel shared by every stream
//! following it, so the work per change is per distinct address, not per
//! subscriber, and a slow subscriber only ever sees the latest state (memory
//! per stream stays bounded whatever the change rate).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::index::{Consumers, Index, Resolution};
use crate::metrics::DestinationMetrics;
use crate::objects::{Key, Kind, Object, Record};
use crate::route::RouteStatus;

/// The status every route should carry, by route.
pub type RouteStatuses = Arc<BTreeMap<Key, RouteStatus>>;

/// How many queued changes are applied in one pass at most.
const BATCH: usize = 4096;
/// Changes a source may queue before it waits for the indexer.
const QUEUE: usize = 8192;

/// A change from a source.
#[derive(Debug)]
pub enum Change {
    /// An object added or modified.
    Upsert(Record),
    /// An object deleted.
    Delete(Kind, Key),
    /// Every object of a kind, replacing what was known (a relist).
    ReplaceKind(Kind, Vec<Record>),
    /// Every object of every kind (a file reload).
    ReplaceAll(Vec<Record>),
    /// The source has delivered its complete initial state.
    Synced,
}

/// The state of one subscribed address.
#[derive(Debug, PartialEq)]
pub struct Resolved {
    /// What it resolves to (with the producer routes of a Service).
    pub result: Resolution,
    /// Consumer routes by client namespace, replacing the producer routes
    /// for clients in that namespace.
    pub consumers: Consumers,
    /// When the source change that produced this state was seen (`None` for
    /// the state computed when the address was first subscribed).
    pub changed_at: Option<Instant>,
}

impl Resolved {
    /// The answer for a client in namespace `client_ns` (`None`: unknown
    /// namespace, producer routes).
    pub fn view(&self, client_ns: Option<&str>) -> Resolution {
        match (&self.result, client_ns.and_then(|ns| self.consumers.get(ns))) {
            (Resolution::Service(svc), Some(set)) => Resolution::Service(sidemesh_proto::destination::v1::Service {
                routes: set.routes.clone(),
                backends: set.backends.clone(),
                ..svc.clone()
            }),
            (result, _) => result.clone(),
        }
    }
}

struct State {
    index: Index,
    subscriptions: HashMap<SocketAddr, watch::Sender<Arc<Resolved>>>,
}

struct Shared {
    state: Mutex<State>,
    trust_domain: String,
    synced: watch::Sender<bool>,
    statuses: watch::Sender<RouteStatuses>,
}

/// Handle on the index, for the gRPC service.
#[derive(Clone)]
pub struct Indexer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Indexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Indexer")
            .field("trust_domain", &self.shared.trust_domain)
            .finish_non_exhaustive()
    }
}

/// What a source sends its changes through.
#[derive(Clone, Debug)]
pub struct Feed {
    tx: mpsc::Sender<(Change, Instant)>,
    metrics: DestinationMetrics,
    source: &'static str,
    statuses: watch::Receiver<RouteStatuses>,
}

impl Feed {
    /// Queues a change seen at `at`; `false` once the indexer is gone.
    pub async fn send(&self, change: Change, at: Instant) -> bool {
        self.tx.send((change, at)).await.is_ok()
    }

    /// Reduces an object to its record; an object that cannot be indexed is
    /// logged, counted and skipped.
    pub fn record(&self, object: &Object) -> Option<Record> {
        match Record::from_object(object) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(source = self.source, error = %e, "object skipped");
                self.metrics.source_error(self.source, "invalid_object");
                None
            }
        }
    }

    /// The source's name, for logs and metrics.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// The instruments.
    pub fn metrics(&self) -> &DestinationMetrics {
        &self.metrics
    }

    /// The status each HTTPRoute should carry, updated after every change
    /// that can alter one (for a source that writes statuses back).
    pub fn route_statuses(&self) -> watch::Receiver<RouteStatuses> {
        self.statuses.clone()
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the index half-updated in
    // a way worse than a missed change; keep serving.
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Indexer {
    /// Starts the indexing task for a source named `source`.
    pub fn spawn(trust_domain: &str, metrics: DestinationMetrics, source: &'static str) -> (Self, Feed) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                index: Index::new(),
                subscriptions: HashMap::new(),
            }),
            trust_domain: trust_domain.to_owned(),
            synced: watch::channel(false).0,
            statuses: watch::channel(RouteStatuses::default()).0,
        });
        metrics.synced(source, false);
        let statuses = shared.statuses.subscribe();
        tokio::spawn(run(shared.clone(), rx, metrics.clone(), source));
        (
            Self { shared },
            Feed {
                tx,
                metrics,
                source,
                statuses,
            },
        )
    }

    /// Follows `target`; the receiver holds its current state at once.
    pub fn subscribe(&self, target: SocketAddr) -> watch::Receiver<Arc<Resolved>> {
        let mut state = lock(&self.shared);
        if let Some(tx) = state.subscriptions.get(&target) {
            return tx.subscribe();
        }
        let (result, consumers) = state.index.resolve_with_consumers(target, &self.shared.trust_domain);
        let (tx, rx) = watch::channel(Arc::new(Resolved {
            result,
            consumers,
            changed_at: None,
        }));
        state.subscriptions.insert(target, tx);
        rx
    }

    /// Forgets `target` if nobody follows it any more (call after dropping
    /// the receiver).
    pub fn release(&self, target: SocketAddr) {
        let mut state = lock(&self.shared);
        if state
            .subscriptions
            .get(&target)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            state.subscriptions.remove(&target);
        }
    }

    /// What `target` resolves to now.
    pub fn resolve(&self, target: SocketAddr) -> Resolution {
        lock(&self.shared).index.resolve(target, &self.shared.trust_domain)
    }

    /// Becomes `true` once the source has synced.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.shared.synced.subscribe()
    }

    /// Distinct addresses followed.
    pub fn followed(&self) -> usize {
        lock(&self.shared).subscriptions.len()
    }
}

async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<(Change, Instant)>,
    metrics: DestinationMetrics,
    source: &'static str,
) {
    let mut batch = Vec::with_capacity(64);
    let mut reports = Reports::default();
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let first_seen = batch.iter().map(|(_, at)| *at).min();
        let changes = batch.len() as u64;
        let mut synced = false;
        // Route statuses depend on routes and on which Services exist.
        let mut touched: BTreeSet<Kind> = BTreeSet::new();
        let mut state = lock(&shared);
        for (change, _) in batch.drain(..) {
            match change {
                Change::Upsert(r) => {
                    touched.insert(r.kind());
                    state.index.upsert(r);
                }
                Change::Delete(kind, key) => {
                    touched.insert(kind);
                    state.index.remove(kind, &key);
                }
                Change::ReplaceKind(kind, records) => {
                    touched.insert(kind);
                    state.index.replace_kind(kind, records);
                }
                Change::ReplaceAll(mut records) => {
                    touched.extend(Kind::ALL);
                    for kind in Kind::ALL {
                        let (this, rest): (Vec<_>, Vec<_>) = records.into_iter().partition(|r| r.kind() == kind);
                        state.index.replace_kind(kind, this);
                        records = rest;
                    }
                }
                Change::Synced => synced = true,
            }
        }
        let State { index, subscriptions } = &mut *state;
        // Addresses nobody follows any more are dropped here too, in case a
        // stream ended without releasing (a task cancelled mid-way).
        subscriptions.retain(|target, tx| {
            if tx.receiver_count() == 0 {
                return false;
            }
            let (result, consumers) = index.resolve_with_consumers(*target, &shared.trust_domain);
            tx.send_if_modified(|current| {
                if current.result == result && current.consumers == consumers {
                    return false;
                }
                *current = Arc::new(Resolved {
                    result,
                    consumers,
                    changed_at: first_seen,
                });
                true
            });
            true
        });
        for kind in Kind::ALL {
            metrics.objects(kind, index.len(kind));
        }
        let statuses = (touched.contains(&Kind::HttpRoute) || touched.contains(&Kind::Service))
            .then(|| Arc::new(index.route_statuses()));
        let annotations = touched.contains(&Kind::Service).then(|| index.invalid_annotations());
        drop(state);
        if let Some(statuses) = statuses {
            reports.routes(&statuses, &metrics);
            shared.statuses.send_replace(statuses);
        }
        if let Some(annotations) = annotations {
            reports.annotations(&annotations, &metrics);
        }
        metrics.source_updates(changes);
        if synced && !*shared.synced.borrow() {
            tracing::info!(source, "source synced");
            metrics.synced(source, true);
            shared.synced.send_replace(true);
        }
    }
}

/// What was last reported about invalid configuration, so that logs and
/// gauges change only when it does.
#[derive(Default)]
struct Reports {
    problems: BTreeMap<Key, Vec<(&'static str, String)>>,
    reasons: BTreeSet<&'static str>,
    annotations: BTreeSet<&'static str>,
}

impl Reports {
    fn routes(&mut self, statuses: &BTreeMap<Key, RouteStatus>, metrics: &DestinationMetrics) {
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (key, status) in statuses {
            for (reason, _) in &status.problems {
                *counts.entry(reason).or_default() += 1;
            }
            let before = self.problems.get(key).map(Vec::as_slice).unwrap_or_default();
            if before != status.problems.as_slice() {
                if status.problems.is_empty() {
                    tracing::info!(route = %key, "HTTPRoute problems resolved");
                } else {
                    let problems: Vec<String> = status.problems.iter().map(|(r, m)| format!("{r}: {m}")).collect();
                    tracing::warn!(route = %key, ?problems, "HTTPRoute has problems: invalid rules are dropped, unresolved backends answer 500");
                }
            }
        }
        self.problems = statuses
            .iter()
            .filter(|(_, s)| !s.problems.is_empty())
            .map(|(k, s)| (k.clone(), s.problems.clone()))
            .collect();
        self.reasons.extend(counts.keys());
        for reason in &self.reasons {
            metrics.route_problems(reason, counts.get(reason).copied().unwrap_or(0));
        }
    }

    fn annotations(&mut self, counts: &BTreeMap<&'static str, usize>, metrics: &DestinationMetrics) {
        self.annotations.extend(counts.keys());
        for a in &self.annotations {
            metrics.invalid_annotations(a, counts.get(a).copied().unwrap_or(0) as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::objects::{PodRecord, PortSet};

    fn pod(name: &str, ip: &str, meshed: bool) -> Record {
        Record::Pod(PodRecord {
            key: Key::new("default", name),
            ips: vec![ip.parse().unwrap()],
            service_account: "sa".into(),
            meshed,
            ready: true,
            opaque_ports: PortSet::default(),
        })
    }

    fn metrics() -> DestinationMetrics {
        DestinationMetrics::new(&opentelemetry::global::meter("test"))
    }

    #[tokio::test]
    async fn publishes_changes_once_per_address_and_forgets_unfollowed_ones() {
        let (indexer, feed) = Indexer::spawn("cluster.local", metrics(), "test");
        let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut a = indexer.subscribe(target);
        let b = indexer.subscribe(target);
        assert_eq!(indexer.followed(), 1, "one channel per address");
        assert!(matches!(a.borrow_and_update().result, Resolution::Unknown(_)));

        let at = Instant::now();
        feed.send(Change::Upsert(pod("p", "10.0.0.1", true)), at).await;
        feed.send(Change::Synced, at).await;
        tokio::time::timeout(Duration::from_secs(2), a.changed())
            .await
            .unwrap()
            .unwrap();
        let state = a.borrow_and_update().clone();
        assert!(matches!(&state.result, Resolution::Pod(p) if p.meshed));
        assert_eq!(state.changed_at, Some(at));
        let mut synced = indexer.synced();
        tokio::time::timeout(Duration::from_secs(2), synced.wait_for(|s| *s))
            .await
            .unwrap()
            .unwrap();

        // An unrelated change publishes nothing for this address.
        feed.send(Change::Upsert(pod("q", "10.0.0.2", true)), Instant::now())
            .await;
        feed.send(Change::ReplaceAll(vec![pod("p", "10.0.0.1", true)]), Instant::now())
            .await;
        assert!(
            tokio::time::timeout(Duration::from_millis(200), a.changed())
                .await
                .is_err()
        );

        drop(a);
        indexer.release(target);
        assert_eq!(indexer.followed(), 1, "still followed by b");
        drop(b);
        indexer.release(target);
        assert_eq!(indexer.followed(), 0);
    }
}
