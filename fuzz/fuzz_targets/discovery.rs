//! Discovery end to end: Kubernetes objects as the destination service's
//! file source reads them (any bytes), indexed, resolved for every Service
//! address and Pod IP they name, sent over the wire, and compiled into the
//! policy a proxy routes with. Whatever the objects say, nothing panics.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use sidemesh_destination::index::Index;
use sidemesh_destination::objects::{Object, Record};
use sidemesh_proto::destination::v1 as pb;
use sidemesh_proxy::policy::ServicePolicy;
use sidemesh_proxy::retry::Budget;

/// The addresses a proxy could subscribe to: ClusterIP × port, Pod IP:80.
fn targets(objects: &[Object]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for o in objects {
        match o {
            Object::Service(svc) => {
                let Some(spec) = &svc.spec else { continue };
                let ips = spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter());
                for ip in ips.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                    for p in spec.ports.iter().flatten() {
                        if let Ok(port) = u16::try_from(p.port) {
                            out.push(SocketAddr::new(ip, port));
                        }
                    }
                }
            }
            Object::Pod(pod) => {
                if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
                    if let Ok(ip) = ip.parse::<IpAddr>() {
                        out.push(SocketAddr::new(ip, 80));
                    }
                }
            }
            _ => {}
        }
    }
    out.truncate(64);
    out
}

/// What a proxy does with an answer: decode it and compile the policy.
fn proxy_side(result: pb::discovery_response::Result, target: SocketAddr) {
    let rsp = pb::DiscoveryResponse {
        target: target.to_string(),
        result: Some(result),
    };
    let wire = rsp.encode_to_vec();
    let back = pb::DiscoveryResponse::decode(wire.as_slice()).expect("own encoding decodes");
    assert_eq!(back, rsp);
    if let Some(pb::discovery_response::Result::Service(svc)) = back.result {
        let policy = ServicePolicy::compile(svc, Arc::new(Budget::new(0.2, 10, Duration::from_secs(10))));
        for path in ["/", "/api/v1/items?id=1", "/%zz", "//"] {
            let req = http::Request::get(path)
                .header("x-canary", "1")
                .body(())
                .expect("request");
            if let Some(rule) = policy.select(&req) {
                for b in &rule.backends {
                    let _ = policy.endpoints(&b.key);
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = sidemesh_destination::source::file::parse(data) else {
        return;
    };
    let mut index = Index::new();
    for o in &parsed.objects {
        if let Ok(record) = Record::from_object(o) {
            index.upsert(record);
        }
    }
    let _ = index.route_statuses();
    let _ = index.invalid_annotations();
    for target in targets(&parsed.objects) {
        let (result, consumers) = index.resolve_with_consumers(target, "cluster.local");
        // What a client in each namespace with consumer routes is sent.
        if let pb::discovery_response::Result::Service(svc) = &result {
            for set in consumers.values() {
                let view = pb::Service {
                    routes: set.routes.clone(),
                    backends: set.backends.clone(),
                    ..svc.clone()
                };
                proxy_side(pb::discovery_response::Result::Service(view), target);
            }
        }
        proxy_side(result, target);
    }
});
