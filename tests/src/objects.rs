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

/// An HTTPRoute (`gateway.networking.k8s.io/v1`) attached to Service `parent`
/// (GAMMA: `group: ""`, `kind: Service`), on Service port `port` if given,
/// with `rules` as written in the spec (JSON values; see [`rule`]).
pub fn httproute(ns: &str, name: &str, parent: &str, port: Option<u16>, rules: Vec<Value>) -> Value {
    let mut parent_ref = json!({ "group": "", "kind": "Service", "name": parent });
    if let Some(port) = port {
        parent_ref["port"] = json!(port);
    }
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "parentRefs": [parent_ref], "rules": rules },
    })
}

/// A route rule sending to `(service, port, weight)` backendRefs, with
/// `extra` merged in (`matches`, `timeouts`, `retry`…).
pub fn rule(backends: &[(&str, u16, i64)], extra: Value) -> Value {
    let mut rule = json!({
        "backendRefs": backends
            .iter()
            .map(|(name, port, weight)| json!({ "name": name, "port": port, "weight": weight }))
            .collect::<Vec<_>>(),
    });
    if let (Some(rule), Value::Object(extra)) = (rule.as_object_mut(), extra) {
        rule.extend(extra);
    }
    rule
}

/// A multi-document YAML file of objects.
pub fn yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{}\n", serde_json::to_string_pretty(o).unwrap_or_default()))
        .collect()
}
