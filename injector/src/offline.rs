//! Offline injection (`sidemesh inject`): multi-document YAML in, the same
//! documents out, with every Pod template injected by the webhook's own
//! [`crate::inject::plan`].
//!
//! There is no API server offline, so a Namespace's annotation cannot be
//! read. The rule, as with `linkerd inject`: a workload is injected unless its
//! Pod (template) says `sidemesh.io/inject: disabled`; everything else the
//! webhook skips (hostNetwork, already injected, kube-system and
//! sidemesh-system) is skipped here too, and an invalid override annotation
//! is an error that names the document.

use serde_json::Value;

use crate::inject::{self, InjectorConfig, NamespaceView, Plan};

/// Why offline injection failed.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The input is not YAML.
    #[error("the input is not valid YAML: {0}")]
    Yaml(String),
    /// A document is refused (invalid annotation, malformed template).
    #[error("document {index} ({kind} {name}): {reason}")]
    Refused {
        /// 1-based document number.
        index: usize,
        /// Its kind.
        kind: String,
        /// Its name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The output could not be written as YAML.
    #[error("writing YAML: {0}")]
    Output(String),
}

/// What happened to one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentReport {
    /// Its kind (empty when none).
    pub kind: String,
    /// Its name.
    pub name: String,
    /// `injected`, `skipped: <reason>` or `passed through`.
    pub result: String,
}

/// Where the Pod template of an object sits (JSON pointer), if it has one.
/// The API group is checked too: a custom resource may be called `Deployment`.
pub fn template_path(api_version: &str, kind: &str) -> Option<&'static str> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        ("", "Pod") => Some(""),
        ("", "ReplicationController") => Some("/spec/template"),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => Some("/spec/template"),
        ("batch", "Job") => Some("/spec/template"),
        ("batch", "CronJob") => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Injects one parsed object in place; returns what happened.
pub fn inject_object(config: &InjectorConfig, object: &mut Value, index: usize) -> Result<String, OfflineError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let refused = |reason: String| OfflineError::Refused {
        index,
        kind: kind.clone(),
        name: name.clone(),
        reason,
    };
    let api_version = object.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    if api_version == "v1" && kind == "List" {
        // `kubectl get -o yaml` wraps objects in a List.
        let mut results = Vec::new();
        if let Some(items) = object.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                results.push(inject_object(config, item, index)?);
            }
        }
        return Ok(format!("list: {}", results.join(", ")));
    }
    let Some(path) = template_path(api_version, &kind) else {
        return Ok("passed through".to_owned());
    };
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Some(template) = object.pointer_mut(path) else {
        return Err(refused(format!("no Pod template at {path}")));
    };
    let plan = inject::plan_json(config, template, namespace.as_deref(), NamespaceView::Offline);
    match plan {
        Plan::Inject { patch, .. } => {
            json_patch::patch(template, &patch).map_err(|e| refused(format!("applying the patch: {e}")))?;
            Ok("injected".to_owned())
        }
        Plan::Skip(reason) => Ok(format!("skipped: {}", reason.as_str())),
        Plan::Deny(denial) => Err(refused(denial.to_string())),
    }
}

/// Injects every document of a multi-document YAML stream; documents that
/// are not workloads come back unchanged (as parsed and re-serialised).
pub fn inject_yaml(config: &InjectorConfig, input: &str) -> Result<(String, Vec<DocumentReport>), OfflineError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(input).map_err(|e| OfflineError::Yaml(e.to_string()))?;
    let mut out = String::with_capacity(input.len() * 2);
    let mut reports = Vec::with_capacity(docs.len());
    for (i, mut doc) in docs.into_iter().enumerate() {
        // Empty documents (a trailing `---`, comment-only documents) vanish.
        if doc.is_null() {
            continue;
        }
        if !doc.is_object() {
            return Err(OfflineError::Refused {
                index: i + 1,
                kind: String::new(),
                name: String::new(),
                reason: "not a Kubernetes object (a YAML mapping)".into(),
            });
        }
        let result = inject_object(config, &mut doc, i + 1)?;
        reports.push(DocumentReport {
            kind: doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned(),
            name: doc
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            result,
        });
        let yaml = serde_saphyr::to_string(&doc).map_err(|e| OfflineError::Output(e.to_string()))?;
        out.push_str("---\n");
        out.push_str(&yaml);
        if !yaml.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok((out, reports))
}
