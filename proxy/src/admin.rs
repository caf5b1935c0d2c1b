//! The proxy's admin server (plain HTTP on the admin port): `/ready`,
//! `/live`, `/metrics` from the shared admin endpoint, plus `/debug/state`
//! and `POST /shutdown`.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use sidemesh_proto::destination::v1 as pb;

use crate::Proxy;
use crate::discovery::Resolution;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn endpoint_json(ep: &pb::Endpoint) -> Value {
    json!({
        "address": ep.address,
        "port": ep.port,
        "identity": ep.identity,
        "meshed": ep.meshed,
        "ready": ep.ready,
        "pod": ep.pod,
    })
}

/// The `/debug/state` document: own identity and certificate, trusted roots,
/// and what discovery knows (fingerprints are lowercase hex SHA-256).
pub fn state(proxy: &Proxy) -> Value {
    let cert = proxy.certs.as_ref().and_then(|c| c.current());
    let roots: Vec<String> = proxy
        .trust
        .as_ref()
        .map(|t| t.current().fingerprints())
        .unwrap_or_default();
    let targets: Vec<Value> = proxy
        .discovery
        .snapshot()
        .into_iter()
        .map(|(target, res)| match res {
            None => json!({ "target": target.to_string(), "kind": "pending" }),
            Some(Resolution::Unknown) => json!({ "target": target.to_string(), "kind": "unknown" }),
            Some(Resolution::Pod(ep)) => json!({ "target": target.to_string(), "kind": "pod", "endpoint": endpoint_json(&ep.raw) }),
            Some(Resolution::Service(policy)) => { let svc = &policy.service; json!({
                "target": target.to_string(),
                "kind": "service",
                "service": format!("{}/{}", svc.namespace, svc.name),
                "port": svc.port,
                "opaque": svc.opaque,
                "endpoints": svc.default_backend.as_ref().map(|b| b.endpoints.iter().map(endpoint_json).collect::<Vec<_>>()).unwrap_or_default(),
                "backends": svc.backends.iter().map(|b| json!({ "key": b.key, "endpoints": b.endpoints.iter().map(endpoint_json).collect::<Vec<_>>() })).collect::<Vec<_>>(),
                "routes": svc.routes.iter().map(|r| json!({ "name": r.name, "rule": r.rule, "backends": r.backends.iter().map(|b| json!({ "key": b.key, "weight": b.weight })).collect::<Vec<_>>() })).collect::<Vec<_>>(),
            }) }
        })
        .collect();
    json!({
        "identity": cert.as_ref().map(|c| c.id.to_string()),
        "certificate": cert.as_ref().map(|c| json!({
            "not_before_unix": unix(c.not_before),
            "expiry_unix": unix(c.not_after),
            "expires_in_seconds": c.not_after.duration_since(SystemTime::now()).map(|d| d.as_secs()).unwrap_or(0),
            "issuer_fingerprint": c.issuer_fingerprint,
            "root_fingerprint": c.root_fingerprint,
        })),
        "trusted_roots": roots,
        "inbound_policy": proxy.inbound_policy,
        "discovery": {
            "connected": proxy.discovery.connected(),
            "targets": targets,
        },
        "draining": proxy.drain.is_draining(),
        "active_connections": proxy.drain.active(),
    })
}

/// The routes added to the shared admin endpoint.
pub fn routes(proxy: Arc<Proxy>) -> sidemesh_telemetry::admin::ExtraRoutes {
    Arc::new(move |method: &Method, path: &str| match (method, path) {
        (&Method::GET, "/debug/state") => {
            let body = serde_json::to_vec_pretty(&state(&proxy)).unwrap_or_default();
            let mut rsp = Response::new(Full::new(Bytes::from(body)));
            rsp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Some(rsp)
        }
        (&Method::POST, "/shutdown") => {
            tracing::info!("shutdown requested on the admin endpoint");
            proxy.drain.start();
            Some(sidemesh_telemetry::admin::text(StatusCode::OK, "shutting down\n"))
        }
        _ => None,
    })
}
