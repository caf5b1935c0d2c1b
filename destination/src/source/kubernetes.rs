//! `--source kubernetes`: cluster-wide list+watch of Services, EndpointSlices
//! (`discovery.k8s.io/v1`) and Pods with `kube`'s watcher, which resumes a
//! dropped watch from the last resourceVersion it saw and relists when that
//! version has expired (410 Gone). A relist replaces everything known of the
//! kind, so objects deleted while the watch was down disappear too.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::indexer::{Change, Feed};
use crate::objects::{Kind, Object, Record};
use crate::source::SourceError;

/// A Kubernetes client from the usual configuration: `KUBECONFIG` or
/// `~/.kube/config`, else the in-cluster ServiceAccount.
pub async fn client() -> Result<Client, SourceError> {
    Client::try_default()
        .await
        .map_err(|e| SourceError::Kube(e.to_string()))
}

/// Starts the three watches; the feed gets `Synced` once each kind has been
/// listed completely.
pub fn start(client: Client, feed: Feed) {
    let listed = Arc::new(AtomicUsize::new(0));
    spawn_watch::<Service>(Api::all(client.clone()), Kind::Service, feed.clone(), listed.clone());
    spawn_watch::<EndpointSlice>(
        Api::all(client.clone()),
        Kind::EndpointSlice,
        feed.clone(),
        listed.clone(),
    );
    spawn_watch::<Pod>(Api::all(client), Kind::Pod, feed, listed);
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
            if failing {
                tracing::info!(%kind, "watch resumed");
                failing = false;
            }
            let done_listing = matches!(change, Some(Change::ReplaceKind(..)));
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
