//! `--source kubernetes`: cluster-wide list+watch of Services, EndpointSlices
//! (`discovery.k8s.io/v1`), Pods and HTTPRoutes (`gateway.networking.k8s.io/v1`)
//! with `kube`'s watcher, which resumes a dropped watch from the last
//! resourceVersion it saw and relists when that version has expired (410
//! Gone). A relist replaces everything known of the kind, so objects deleted
//! while the watch was down disappear too.
//!
//! The HTTPRoute CRD is optional: without it (404 on the list) the source
//! counts HTTPRoutes as listed and empty, says so once, and keeps trying, so
//! routes appear once the CRD is installed. Route statuses
//! (`status.parents[]`) are written back with merge patches.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::indexer::{Change, Feed, RouteStatuses};
use crate::objects::{Key, Kind, Object, Record};
use crate::route::HttpRoute;
use crate::source::SourceError;

/// A Kubernetes client from the usual configuration: `KUBECONFIG` or
/// `~/.kube/config`, else the in-cluster ServiceAccount.
pub async fn client() -> Result<Client, SourceError> {
    Client::try_default()
        .await
        .map_err(|e| SourceError::Kube(e.to_string()))
}

/// Starts the four watches and the route status writer; the feed gets
/// `Synced` once each kind has been listed completely (HTTPRoutes: or found
/// not installed).
pub fn start(client: Client, feed: Feed) {
    let listed = Arc::new(AtomicUsize::new(0));
    spawn_watch::<Service>(Api::all(client.clone()), Kind::Service, feed.clone(), listed.clone());
    spawn_watch::<EndpointSlice>(
        Api::all(client.clone()),
        Kind::EndpointSlice,
        feed.clone(),
        listed.clone(),
    );
    spawn_watch::<Pod>(Api::all(client.clone()), Kind::Pod, feed.clone(), listed.clone());
    spawn_watch::<HttpRoute>(Api::all(client.clone()), Kind::HttpRoute, feed.clone(), listed);
    tokio::spawn(write_statuses(client, feed.route_statuses()));
}

/// Whether a watcher error says the resource type is not served (a CRD not installed).
fn not_served(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// Watch retry delays: quick at first (a dropped watch is usually an API
/// server restart or a load balancer resetting idle connections), doubling to
/// spare a struggling API server, with jitter so replicas do not retry in step.
/// Reset by the watcher on the first event that gets through.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

impl Backoff {
    fn new() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // Jitter needs no quality randomness: the clock's nanoseconds will do.
        let factor = 0.5 + f64::from(now.subsec_nanos() % 1000) / 2000.0;
        let delay = self.next.mul_f64(factor);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

fn spawn_watch<K>(api: Api<K>, kind: Kind, feed: Feed, listed: Arc<AtomicUsize>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
    Object: From<K>,
{
    tokio::spawn(async move {
        let stream = watcher::watcher(api, watcher::Config::default()).backoff(Backoff::new());
        let mut stream = std::pin::pin!(stream);
        // The objects of a relist in progress, applied at once when it ends.
        let mut relist: Option<Vec<Record>> = None;
        let mut synced = false;
        let mut failing = false;
        // The resource type is not served (HTTPRoute without its CRD).
        let mut absent = false;
        while let Some(event) = stream.next().await {
            let at = Instant::now();
            let record = |obj: K| feed.record(&Object::from(obj));
            let change = match event {
                Ok(Event::Init) => {
                    relist = Some(Vec::new());
                    None
                }
                Ok(Event::InitApply(obj)) => {
                    let r = record(obj);
                    match relist.as_mut() {
                        Some(buf) => {
                            buf.extend(r);
                            None
                        }
                        None => r.map(Change::Upsert),
                    }
                }
                Ok(Event::InitDone) => Some(Change::ReplaceKind(kind, relist.take().unwrap_or_default())),
                Ok(Event::Apply(obj)) => record(obj).map(Change::Upsert),
                Ok(Event::Delete(obj)) => match Record::key_of(&Object::from(obj)) {
                    Ok((kind, key)) => Some(Change::Delete(kind, key)),
                    Err(_) => None,
                },
                // Without the HTTPRoute CRD there are no routes: a complete
                // (empty) list, not an outage, and it must not hold readiness.
                Err(e) if kind == Kind::HttpRoute && not_served(&e) => {
                    relist = None;
                    if absent {
                        continue;
                    }
                    tracing::warn!(%kind, "HTTPRoute (gateway.networking.k8s.io/v1) is not served by the API server: no routes until the Gateway API CRDs are installed; checking again with backoff");
                    absent = true;
                    failing = false;
                    Some(Change::ReplaceKind(kind, Vec::new()))
                }
                Err(e) => {
                    feed.metrics().source_error(feed.source(), kind.as_str());
                    if failing {
                        tracing::debug!(%kind, error = %e, "watch still failing; retrying with backoff");
                    } else {
                        tracing::warn!(%kind, error = %e, "watch failed; retrying with backoff, the last known state stays in force");
                    }
                    failing = true;
                    continue;
                }
            };
            let done_listing = matches!(change, Some(Change::ReplaceKind(..)));
            if relist.is_some()
                || (done_listing && !absent)
                || matches!(change, Some(Change::Upsert(_) | Change::Delete(..)))
            {
                if failing {
                    tracing::info!(%kind, "watch resumed");
                    failing = false;
                }
                if absent {
                    tracing::info!(%kind, "HTTPRoute is served now");
                    absent = false;
                }
            }
            if let Some(change) = change
                && !feed.send(change, at).await
            {
                return;
            }
            if done_listing && !synced {
                synced = true;
                tracing::info!(%kind, "initial list done");
                if listed.fetch_add(1, Ordering::AcqRel) + 1 == Kind::ALL.len() && !feed.send(Change::Synced, at).await
                {
                    return;
                }
            }
        }
    });
}

/// How long a failed status patch waits before it is tried again.
const STATUS_RETRY: Duration = Duration::from_secs(5);
/// The same when refused (no RBAC permission): a setting that rarely changes,
/// not worth a request per route every few seconds.
const STATUS_RETRY_FORBIDDEN: Duration = Duration::from_secs(60);

/// Writes each route's `status.parents` entries when they differ from what
/// the route carries. A patch is conditional on the resourceVersion it was
/// computed from; our own write comes back as a watch event, after which the
/// status is current and nothing more is written.
async fn write_statuses(client: Client, mut statuses: tokio::sync::watch::Receiver<RouteStatuses>) {
    let params = PatchParams {
        field_manager: Some("sidemesh-destination".to_owned()),
        ..PatchParams::default()
    };
    // What was last written for each route, at which resourceVersion: do not
    // write the same thing twice before the watch has shown the result.
    let mut written: std::collections::HashMap<Key, String> = std::collections::HashMap::new();
    let mut warned = false;
    loop {
        let current = statuses.borrow_and_update().clone();
        let mut retry: Option<Duration> = None;
        for (key, status) in current.iter() {
            if status.is_current() || written.get(key) == Some(&status.resource_version) {
                continue;
            }
            let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ))
            .unwrap_or(Value::Null);
            let api: Api<HttpRoute> = Api::namespaced(client.clone(), &key.namespace);
            match api
                .patch_status(&key.name, &params, &Patch::Merge(status.patch(&now)))
                .await
            {
                Ok(_) => {
                    tracing::debug!(route = %key, "HTTPRoute status written");
                    written.insert(key.clone(), status.resource_version.clone());
                }
                // Gone, or changed since: the watch event that follows brings a new status to write.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
                    tracing::debug!(route = %key, code = s.code, "HTTPRoute status not written; waiting for the route's next version");
                    written.insert(key.clone(), status.resource_version.clone());
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(route = %key, error = %e, "writing HTTPRoute status failed (RBAC needs patch on httproutes/status); retrying");
                        warned = true;
                    }
                    let forbidden = matches!(&e, kube::Error::Api(s) if s.code == 403);
                    let delay = if forbidden {
                        STATUS_RETRY_FORBIDDEN
                    } else {
                        STATUS_RETRY
                    };
                    retry = Some(retry.map_or(delay, |d| d.max(delay)));
                    if forbidden {
                        // The other routes would be refused alike.
                        break;
                    }
                }
            }
        }
        written.retain(|k, _| current.contains_key(k));
        tokio::select! {
            changed = statuses.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(retry.unwrap_or(STATUS_RETRY)), if retry.is_some() => {}
        }
    }
}
