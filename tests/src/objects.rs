//! Kubernetes objects for the destination service's file source and the
//! stand-in API server, as JSON values (JSON is YAML).

use serde_json::{Value, json};

/// A Service with a ClusterIP and `(name, port)` ports.
pub fn service(ns: &str, name: &str, ip: &str, ports: &[(&str, u16)], annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": ns, "annotations": annotations },
        "spec": {
            "clusterIP": ip, "clusterIPs": [ip],
            "ports": ports.iter().map(|(n, p)| json!({ "name": n, "port": p, "protocol": "TCP" })).collect::<Vec<_>>(),
        },
    })
}

/// An EndpointSlice of `svc` with `(name, port)` ports and `(ip, pod, ready)` endpoints.
pub fn slice(ns: &str, name: &str, svc: &str, ports: &[(&str, u16)], endpoints: &[(&str, &str, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": name, "namespace": ns, "labels": { "kubernetes.io/service-name": svc } },
        "addressType": "IPv4",
        "ports": ports.iter().map(|(n, p)| json!({ "name": n, "port": p, "protocol": "TCP" })).collect::<Vec<_>>(),
        "endpoints": endpoints.iter().map(|(ip, pod, ready)| json!({
            "addresses": [ip],
            "conditions": { "ready": ready, "serving": ready, "terminating": false },
            "targetRef": { "kind": "Pod", "name": pod, "namespace": ns },
        })).collect::<Vec<_>>(),
    })
}

/// A running Pod; `meshed` adds the `sidemesh.io/injected` marker.
pub fn pod(ns: &str, name: &str, ip: &str, sa: &str, meshed: bool) -> Value {
    let annotations = if meshed {
        json!({ "sidemesh.io/injected": "true" })
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "annotations": annotations },
        "spec": { "serviceAccountName": sa, "containers": [{ "name": "app", "image": "app" }] },
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }],
            "conditions": [{ "type": "Ready", "status": "True" }],
        },
    })
}

/// A multi-document YAML file of objects.
pub fn yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{}\n", serde_json::to_string_pretty(o).unwrap_or_default()))
        .collect()
}
