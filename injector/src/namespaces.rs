//! The Namespace cache: a `kube` reflector over all Namespaces, so an
//! admission reads the Namespace's annotations from memory instead of asking
//! the API server each time. A Namespace the cache has not seen yet (created
//! a moment ago) is fetched once with a short timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};

/// How long a fallback GET of an uncached Namespace may take.
const GET_TIMEOUT: Duration = Duration::from_secs(1);

/// Annotations of one Namespace, shared.
pub type Annotations = Arc<BTreeMap<String, String>>;

/// The cache, cheap to clone.
#[derive(Clone)]
pub struct NamespaceCache {
    store: Store<Namespace>,
    api: Api<Namespace>,
}

impl std::fmt::Debug for NamespaceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceCache")
            .field("namespaces", &self.store.state().len())
            .finish()
    }
}

/// What the cache says of a Namespace.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Known, with its annotations.
    Found(Annotations),
    /// The API server does not know it, or could not be asked.
    Missing,
}

impl NamespaceCache {
    /// Starts the reflector on `client`; it runs (re-listing and re-watching
    /// with backoff after errors) until the runtime stops.
    pub fn start(client: kube::Client) -> Self {
        let api: Api<Namespace> = Api::all(client);
        let (store, writer) = reflector::store();
        // Only the metadata matters; dropping spec and status keeps the cache small.
        let stream = watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .modify(|ns| {
                ns.spec = None;
                ns.status = None;
                ns.metadata.managed_fields = None;
            })
            .reflect(writer);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Apply(ns)) => {
                        let inject = ns
                            .metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(crate::annotations::INJECT))
                            .cloned();
                        tracing::debug!(namespace = ?ns.metadata.name, ?inject, "namespace changed");
                    }
                    Ok(watcher::Event::Delete(ns)) => {
                        tracing::debug!(namespace = ?ns.metadata.name, "namespace deleted");
                    }
                    Ok(watcher::Event::InitDone) => tracing::info!("namespace cache synced"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "namespace watch; retrying"),
                }
            }
        });
        Self { store, api }
    }

    /// Resolves once the first full list has been received.
    pub async fn wait_synced(&self) -> bool {
        self.store.wait_until_ready().await.is_ok()
    }

    /// How many Namespaces are cached.
    pub fn len(&self) -> usize {
        self.store.state().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The Namespace's annotations: from the cache, else one bounded GET.
    pub async fn get(&self, name: &str) -> Lookup {
        if let Some(ns) = self.store.get(&ObjectRef::new(name)) {
            return Lookup::Found(Arc::new(ns.metadata.annotations.clone().unwrap_or_default()));
        }
        if name.is_empty() {
            return Lookup::Missing;
        }
        match tokio::time::timeout(GET_TIMEOUT, self.api.get_opt(name)).await {
            Ok(Ok(Some(ns))) => {
                tracing::debug!(namespace = name, "namespace not cached yet; fetched it");
                Lookup::Found(Arc::new(ns.metadata.annotations.unwrap_or_default()))
            }
            Ok(Ok(None)) => Lookup::Missing,
            Ok(Err(e)) => {
                tracing::warn!(namespace = name, error = %e, "namespace not cached and its GET failed");
                Lookup::Missing
            }
            Err(_) => {
                tracing::warn!(namespace = name, "namespace not cached and its GET timed out");
                Lookup::Missing
            }
        }
    }
}
