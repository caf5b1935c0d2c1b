//! `admission.k8s.io/v1` AdmissionReview in, AdmissionReview out, with kube's
//! admission types. The answer is serialised here rather than with a plain
//! `serde_json::to_vec`: kube's `AdmissionResponse::patch` is a `Vec<u8>`,
//! which serde writes as an array of numbers, while the API server (Go,
//! `[]byte`) expects a base64 string.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use crate::inject::{self, InjectorConfig, NamespaceView, Plan, PodParts};

/// The `kind` of a review.
const KIND: &str = "AdmissionReview";
/// The only review version served (`admissionReviewVersions: ["v1"]`).
const API_VERSION: &str = "admission.k8s.io/v1";

/// A request body that is not an AdmissionReview this webhook can answer:
/// the HTTP answer is 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed AdmissionReview: {0}")]
pub struct BadReview(pub String);

/// A parsed review: the request and what it asks about.
#[derive(Debug)]
pub struct Review {
    /// The request, as kube parsed it.
    pub request: AdmissionRequest<DynamicObject>,
    /// Whether the object as sent has a `metadata` object. kube fills in an
    /// empty one when it is missing, but the patch applies to the object as
    /// sent: without one, `/metadata` must be added whole.
    pub has_metadata: bool,
}

/// Just enough of a review to see whether its object has `metadata`.
#[derive(serde::Deserialize)]
struct Shape {
    request: Option<ShapeRequest>,
}

#[derive(serde::Deserialize)]
struct ShapeRequest {
    object: Option<ShapeObject>,
}

#[derive(serde::Deserialize)]
struct ShapeObject {
    metadata: Option<serde::de::IgnoredAny>,
}

impl Review {
    /// Parses and checks an AdmissionReview body.
    pub fn parse(body: &[u8]) -> Result<Self, BadReview> {
        // JSON is UTF-8 throughout; serde alone would let bad bytes through
        // in the strings it skips (unknown fields) and answer a body that
        // is not JSON.
        let body = std::str::from_utf8(body).map_err(|e| BadReview(format!("not UTF-8: {e}")))?;
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_str(body).map_err(|e| BadReview(e.to_string()))?;
        if review.types.kind != KIND || review.types.api_version != API_VERSION {
            return Err(BadReview(format!(
                "expected kind {KIND} and apiVersion {API_VERSION}, got kind {:?} and apiVersion {:?}",
                review.types.kind, review.types.api_version
            )));
        }
        let request: AdmissionRequest<DynamicObject> = review
            .try_into()
            .map_err(|_| BadReview("the review has no request".into()))?;
        if request.uid.is_empty() {
            return Err(BadReview("request.uid is empty".into()));
        }
        // Only an empty `metadata` can be a missing one, and the API server
        // never sends one empty (a Pod has a name or generateName): the
        // second, shallow pass stays off the path real reviews take.
        let has_metadata = request
            .object
            .as_ref()
            .is_none_or(|o| o.metadata != ObjectMeta::default())
            || serde_json::from_str::<Shape>(body)
                .ok()
                .and_then(|s| s.request?.object)
                .is_none_or(|o| o.metadata.is_some());
        Ok(Self { request, has_metadata })
    }

    /// The namespace the object is created in.
    pub fn namespace(&self) -> Option<&str> {
        self.request
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .or_else(|| self.request.object.as_ref()?.metadata.namespace.as_deref())
            .filter(|n| !n.is_empty())
    }

    /// The Pod's name for logs (`generateName…` before it has one).
    pub fn pod_name(&self) -> String {
        let meta = self.request.object.as_ref().map(|o| &o.metadata);
        match meta {
            Some(m) if m.name.as_deref().is_some_and(|n| !n.is_empty()) => m.name.clone().unwrap_or_default(),
            Some(m) => format!("{}…", m.generate_name.as_deref().unwrap_or_default()),
            None => self.request.name.clone(),
        }
    }

    /// Whether this review is about creating a Pod (anything else is let
    /// through unchanged: the webhook is registered for Pod CREATE only).
    pub fn is_pod_create(&self) -> bool {
        let k = &self.request.kind;
        self.request.operation == Operation::Create
            && k.group.is_empty()
            && k.version == "v1"
            && k.kind == "Pod"
            && self.request.sub_resource.as_deref().is_none_or(str::is_empty)
    }
}

/// What became of one review, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `injected`, `skipped` or `denied`.
    pub outcome: &'static str,
    /// Why (a metric label).
    pub reason: &'static str,
    /// The denial message, if denied.
    pub message: Option<String>,
}

/// Answers a parsed review, with the Namespace as `namespace` says.
pub fn answer(config: &InjectorConfig, review: &Review, namespace: NamespaceView<'_>) -> (AdmissionResponse, Verdict) {
    let response = AdmissionResponse::from(&review.request);
    if !review.is_pod_create() {
        return (response, verdict("skipped", "not-pod-create", None));
    }
    let Some(object) = review.request.object.as_ref() else {
        return (
            response.deny("request.object is missing"),
            verdict("denied", "malformed-pod", Some("request.object is missing".into())),
        );
    };
    let no_spec = Value::Null;
    let pod = PodParts {
        namespace: review.namespace(),
        annotations: object.metadata.annotations.as_ref(),
        has_metadata: review.has_metadata,
        spec: object.data.get("spec").unwrap_or(&no_spec),
    };
    match inject::plan(config, pod, namespace) {
        Plan::Skip(reason) => (response, verdict("skipped", reason.as_str(), None)),
        Plan::Deny(denial) => {
            let message = denial.to_string();
            let mut response = response.deny(&message);
            response.result.code = 400;
            response.result.reason = "Invalid".to_owned();
            (response, verdict("denied", denial.as_str(), Some(message)))
        }
        Plan::Inject { patch, reason, .. } => match response.clone().with_patch(patch) {
            Ok(r) => (r, verdict("injected", reason.as_str(), None)),
            // Serialising a patch of JSON values cannot fail; if it ever
            // did, admitting the Pod unchanged beats refusing it.
            Err(e) => (response, verdict("skipped", "patch-error", Some(e.to_string()))),
        },
    }
}

fn verdict(outcome: &'static str, reason: &'static str, message: Option<String>) -> Verdict {
    Verdict {
        outcome,
        reason,
        message,
    }
}

/// Serialises the answer as the API server expects it: an AdmissionReview
/// with `response.patch` as base64.
pub fn encode(mut response: AdmissionResponse) -> Vec<u8> {
    let patch = response.patch.take();
    let mut review = match serde_json::to_value(response.into_review()) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    if let (Some(patch), Some(r)) = (patch, review.get_mut("response").and_then(Value::as_object_mut)) {
        r.insert(
            "patch".to_owned(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(patch)),
        );
    }
    serde_json::to_vec(&review).unwrap_or_default()
}

/// A namespace source that knows a fixed set of Namespaces (tests, fuzzing,
/// benchmarks without an API server).
#[derive(Debug, Clone, Default)]
pub struct StaticNamespaces(pub BTreeMap<String, BTreeMap<String, String>>);

impl StaticNamespaces {
    /// The view of `name`.
    pub fn view<'a>(&'a self, name: &'a str) -> NamespaceView<'a> {
        match self.0.get(name) {
            Some(annotations) => NamespaceView::Known { name, annotations },
            None => NamespaceView::Unknown(name),
        }
    }
}

/// The whole path for one body against a fixed set of Namespaces: parse,
/// decide, encode. The webhook does the same with its cache.
pub fn handle_static(
    config: &InjectorConfig,
    namespaces: &StaticNamespaces,
    body: &[u8],
) -> Result<(Vec<u8>, Verdict), BadReview> {
    let review = Review::parse(body)?;
    let ns = review.namespace().unwrap_or_default().to_owned();
    let (response, verdict) = answer(config, &review, namespaces.view(&ns));
    Ok((encode(response), verdict))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(pod: Value, namespace: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "kind": "AdmissionReview",
            "apiVersion": "admission.k8s.io/v1",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": pod,
                "oldObject": null,
                "dryRun": false
            }
        }))
        .unwrap()
    }

    fn web_pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]}
        })
    }

    fn namespaces() -> StaticNamespaces {
        let mut m = BTreeMap::new();
        m.insert(
            "apps".to_owned(),
            BTreeMap::from([("sidemesh.io/inject".to_owned(), "enabled".to_owned())]),
        );
        StaticNamespaces(m)
    }

    /// The patch in an answer, decoded.
    fn patch_of(out: &[u8]) -> json_patch::Patch {
        let out: Value = serde_json::from_slice(out).unwrap();
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap())
            .unwrap();
        serde_json::from_slice(&patch).unwrap()
    }

    /// Found by the `admission` fuzz target: a Pod sent without `metadata`
    /// (or with `"metadata": null`) used to get a patch adding
    /// `/metadata/annotations`, which cannot apply to it.
    #[test]
    fn a_pod_without_metadata_gets_a_patch_that_applies() {
        let config = InjectorConfig::default();
        let bare = json!({"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "web", "image": "y"}]}});
        let mut null_meta = bare.clone();
        null_meta["metadata"] = Value::Null;
        for pod in [bare, null_meta] {
            let Ok((out, verdict)) = handle_static(&config, &namespaces(), &review(pod.clone(), "apps")) else {
                // kube may refuse a null `metadata` outright: a clear 400, also fine.
                continue;
            };
            assert_eq!(verdict.outcome, "injected", "{pod}");
            let mut patched = pod.clone();
            json_patch::patch(&mut patched, &patch_of(&out)).unwrap_or_else(|e| panic!("{pod}: {e}"));
            assert_eq!(patched["metadata"]["annotations"]["sidemesh.io/injected"], "true");
        }
        // With `metadata` but no annotations, the rest of `metadata` stays.
        let (out, _) = handle_static(&config, &namespaces(), &review(web_pod(), "apps")).unwrap();
        let mut patched = web_pod();
        json_patch::patch(&mut patched, &patch_of(&out)).unwrap();
        assert_eq!(patched["metadata"]["labels"]["app"], "web");
        assert_eq!(patched["metadata"]["name"], "web");
    }

    #[test]
    fn patch_is_base64_json_patch_and_applies() {
        let config = InjectorConfig::default();
        let (out, verdict) = handle_static(&config, &namespaces(), &review(web_pod(), "apps")).unwrap();
        assert_eq!(verdict.outcome, "injected");
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let mut pod = web_pod();
        json_patch::patch(&mut pod, &patch).unwrap();
        assert_eq!(pod["spec"]["containers"][0]["name"], "sidemesh-proxy");
        assert_eq!(pod["spec"]["containers"][1]["name"], "web");
        assert_eq!(pod["spec"]["initContainers"][0]["name"], "sidemesh-init");
        assert_eq!(pod["metadata"]["annotations"]["sidemesh.io/injected"], "true");
        // Idempotent: the patched Pod is left alone.
        let (out, verdict) = handle_static(&config, &namespaces(), &review(pod, "apps")).unwrap();
        assert_eq!(verdict.reason, "already-injected");
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert!(out["response"].get("patch").is_none());
    }

    #[test]
    fn malformed_reviews_are_errors() {
        for body in [
            &b""[..],
            b"{}",
            b"null",
            b"[1,2]",
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#,
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1beta1","request":{}}"#,
            // Found by the fuzzer: a bad byte in a field nobody reads.
            &review(json!({"metadata": {"x": "w\u{fffd}eb"}, "spec": {}}), "apps")
                .iter()
                .map(|&b| if b == 0xef { 0xaf } else { b })
                .collect::<Vec<u8>>(),
        ] {
            assert!(
                handle_static(&InjectorConfig::default(), &namespaces(), body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
