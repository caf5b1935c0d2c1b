//! `--source file:<path>`: Kubernetes objects from a multi-document YAML file
//! (what `kubectl get -o yaml` prints, `List`s included), re-read when it
//! changes. A version that does not parse is logged and counted, and the last
//! good one stays in force.

use std::path::{Path, PathBuf};
use std::time::Instant;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use crate::indexer::{Change, Feed};
use crate::objects::Object;
use crate::route::HttpRoute;
use crate::source::SourceError;

/// Objects parsed from a file, and the kinds it held that sidemesh does not
/// index (Deployments, ConfigMaps…).
#[derive(Debug, Default)]
pub struct Parsed {
    /// Indexed objects.
    pub objects: Vec<Object>,
    /// `apiVersion/kind` of each ignored object.
    pub ignored: Vec<String>,
}

fn budget() -> serde_saphyr::Options {
    // The defaults stop at 1024 documents, which a real cluster dump exceeds;
    // the other limits (depth, aliases) stay as protection against bombs.
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 200_000,
            max_nodes: 20_000_000,
            max_events: 50_000_000,
        },
        // One-line errors: they end up in a log line or a start-up failure.
        with_snippet: false,
    }
}

/// Parses the file's text.
pub fn parse(text: &[u8]) -> Result<Parsed, String> {
    let text = std::str::from_utf8(text).map_err(|e| format!("not UTF-8 text: {e}"))?;
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, budget()).map_err(|e| format!("not valid YAML: {e}"))?;
    let mut parsed = Parsed::default();
    for (i, doc) in docs.into_iter().enumerate() {
        add(doc, &mut parsed).map_err(|e| format!("document {}: {e}", i + 1))?;
    }
    Ok(parsed)
}

fn describe(doc: &Value) -> String {
    let field = |f: &str| doc.get(f).and_then(Value::as_str).unwrap_or("?");
    let meta = |f: &str| {
        doc.get("metadata")
            .and_then(|m| m.get(f))
            .and_then(Value::as_str)
            .unwrap_or("?")
    };
    format!("{} {}/{}", field("kind"), meta("namespace"), meta("name"))
}

fn typed<T: serde::de::DeserializeOwned>(doc: Value) -> Result<T, String> {
    let what = describe(&doc);
    serde_json::from_value(doc).map_err(|e| format!("{what}: {e}"))
}

fn add(doc: Value, parsed: &mut Parsed) -> Result<(), String> {
    if doc.is_null() {
        return Ok(());
    }
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    if api_version.is_empty() || kind.is_empty() {
        return Err("not a Kubernetes object: apiVersion and kind are required".into());
    }
    match (api_version, kind) {
        ("v1", "Service") => parsed.objects.push(typed::<Service>(doc)?.into()),
        ("v1", "Pod") => parsed.objects.push(typed::<Pod>(doc)?.into()),
        ("discovery.k8s.io/v1", "EndpointSlice") => parsed.objects.push(typed::<EndpointSlice>(doc)?.into()),
        // v1beta1 is the same schema, still served next to v1.
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
            parsed.objects.push(typed::<HttpRoute>(doc)?.into())
        }
        (_, "List") | (_, "ServiceList") | (_, "PodList") | (_, "EndpointSliceList") | (_, "HTTPRouteList") => {
            let Some(Value::Array(items)) = doc.get("items").cloned() else {
                return Err(format!("{kind} without items"));
            };
            for item in items {
                add(item, parsed)?;
            }
        }
        _ => parsed.ignored.push(format!("{api_version}/{kind}")),
    }
    Ok(())
}

fn load(path: &Path) -> Result<Parsed, String> {
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    parse(&text)
}

async fn publish(feed: &Feed, parsed: Parsed, at: Instant) -> bool {
    if !parsed.ignored.is_empty() {
        tracing::debug!(ignored = ?parsed.ignored, "objects of kinds not indexed");
    }
    let records = parsed.objects.iter().filter_map(|o| feed.record(o)).collect();
    feed.send(Change::ReplaceAll(records), at).await
}

/// Loads `path` (failing if it cannot be read or parsed: there is no last good
/// state yet) and follows its changes.
pub async fn start(path: PathBuf, feed: Feed) -> Result<(), SourceError> {
    let shown = path.display().to_string();
    // Latest content wins: a burst of edits while a reload runs costs one more
    // reload, and memory stays at one copy of the file.
    let (tx, mut rx) = tokio::sync::watch::channel::<Option<(std::sync::Arc<[u8]>, Instant)>>(None);
    // Watch first, then read: a change between the two is seen twice (harmless)
    // rather than missed.
    sidemesh_identity_client::watch::spawn(path.clone(), move |bytes| {
        tx.send(Some((bytes.into(), Instant::now()))).is_ok()
    });
    let started = Instant::now();
    let parsed = load(&path).map_err(|reason| SourceError::File {
        path: shown.clone(),
        reason,
    })?;
    tracing::info!(path = %shown, objects = parsed.objects.len(), ignored = parsed.ignored.len(), "source file loaded");
    publish(&feed, parsed, started).await;
    feed.send(Change::Synced, started).await;
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let Some((bytes, at)) = rx.borrow_and_update().clone() else {
                continue;
            };
            match parse(&bytes) {
                Ok(parsed) => {
                    tracing::info!(path = %shown, objects = parsed.objects.len(), ignored = parsed.ignored.len(), "source file reloaded");
                    if !publish(&feed, parsed, at).await {
                        return;
                    }
                }
                Err(e) => {
                    feed.metrics().source_error(feed.source(), "parse");
                    tracing::warn!(path = %shown, error = %e, "source file refused; the previous state stays in force");
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documents_lists_and_ignores_other_kinds() {
        let text = br#"
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  clusterIP: 10.96.0.10
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: { name: web-a, annotations: { sidemesh.io/injected: "true" } }
  spec: { containers: [{ name: app, image: x }] }
  status: { podIP: 10.0.0.1 }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: r }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: d }
---
"#;
        let parsed = parse(text).unwrap();
        assert_eq!(parsed.objects.len(), 3);
        assert_eq!(parsed.ignored, vec!["apps/v1/Deployment"]);
    }

    #[test]
    fn refuses_broken_files_with_the_document_named() {
        for (text, needle) in [
            ("{ this is: [not, valid", "YAML"),
            ("kind: Service\n", "apiVersion"),
            (
                "apiVersion: v1\nkind: Service\nmetadata: { name: a }\nspec: { ports: [{ port: http }] }\n",
                "document 1: Service ?/a",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: r }\nspec: { rules: oops }\n",
                "document 1: HTTPRoute ?/r",
            ),
        ] {
            let e = parse(text.as_bytes()).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
