//! The index: records of Services, EndpointSlices and Pods, with the reverse
//! maps that answer "what is `ip:port`?" without scanning. Pure data, no I/O;
//! [`crate::indexer`] runs it and tells subscribers about changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use sidemesh_identity_client::SpiffeId;
use sidemesh_proto::destination::v1 as pb;

use crate::objects::{Key, Kind, PodRecord, Record, ServiceRecord, SliceRecord};

/// Retry budget defaults (DESIGN.md): 20% extra load over 10 s, plus 10 retries/s.
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// Retries always allowed per second, whatever the ratio.
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
/// Window over which the ratio is measured.
pub const DEFAULT_BUDGET_WINDOW_SECONDS: i64 = 10;

/// What an address resolves to (the `result` of a `DiscoveryResponse`).
pub type Resolution = pb::discovery_response::Result;

/// Records and reverse maps.
#[derive(Debug, Default)]
pub struct Index {
    services: HashMap<Key, Arc<ServiceRecord>>,
    slices: HashMap<Key, Arc<SliceRecord>>,
    pods: HashMap<Key, Arc<PodRecord>>,
    /// Cluster IP → Services claiming it (normally one).
    vips: HashMap<IpAddr, BTreeSet<Key>>,
    /// Service → its EndpointSlices.
    slices_by_service: HashMap<Key, BTreeSet<Key>>,
    /// Pod IP → Pods claiming it (normally one).
    pods_by_ip: HashMap<IpAddr, BTreeSet<Key>>,
}

fn unlink<K: std::hash::Hash + Eq>(map: &mut HashMap<K, BTreeSet<Key>>, at: K, key: &Key) {
    if let Some(set) = map.get_mut(&at) {
        set.remove(key);
        if set.is_empty() {
            map.remove(&at);
        }
    }
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records of `kind`.
    pub fn len(&self, kind: Kind) -> usize {
        match kind {
            Kind::Service => self.services.len(),
            Kind::EndpointSlice => self.slices.len(),
            Kind::Pod => self.pods.len(),
        }
    }

    /// Adds or replaces a record.
    pub fn upsert(&mut self, record: Record) {
        let key = record.key().clone();
        self.remove(record.kind(), &key);
        match record {
            Record::Service(s) => {
                for ip in &s.cluster_ips {
                    self.vips.entry(*ip).or_default().insert(key.clone());
                }
                self.services.insert(key, Arc::new(s));
            }
            Record::Slice(s) => {
                if let Some(svc) = &s.service {
                    self.slices_by_service
                        .entry(svc.clone())
                        .or_default()
                        .insert(key.clone());
                }
                self.slices.insert(key, Arc::new(s));
            }
            Record::Pod(p) => {
                for ip in &p.ips {
                    self.pods_by_ip.entry(*ip).or_default().insert(key.clone());
                }
                self.pods.insert(key, Arc::new(p));
            }
        }
    }

    /// Removes a record if present.
    pub fn remove(&mut self, kind: Kind, key: &Key) {
        match kind {
            Kind::Service => {
                if let Some(old) = self.services.remove(key) {
                    for ip in &old.cluster_ips {
                        unlink(&mut self.vips, *ip, key);
                    }
                }
            }
            Kind::EndpointSlice => {
                if let Some(old) = self.slices.remove(key)
                    && let Some(svc) = &old.service
                {
                    unlink(&mut self.slices_by_service, svc.clone(), key);
                }
            }
            Kind::Pod => {
                if let Some(old) = self.pods.remove(key) {
                    for ip in &old.ips {
                        unlink(&mut self.pods_by_ip, *ip, key);
                    }
                }
            }
        }
    }

    /// Replaces every record of `kind` (a relist).
    pub fn replace_kind(&mut self, kind: Kind, records: Vec<Record>) {
        match kind {
            Kind::Service => {
                self.services.clear();
                self.vips.clear();
            }
            Kind::EndpointSlice => {
                self.slices.clear();
                self.slices_by_service.clear();
            }
            Kind::Pod => {
                self.pods.clear();
                self.pods_by_ip.clear();
            }
        }
        for r in records.into_iter().filter(|r| r.kind() == kind) {
            self.upsert(r);
        }
    }

    /// Resolves an original destination for a proxy in `trust_domain`.
    pub fn resolve(&self, target: SocketAddr, trust_domain: &str) -> Resolution {
        if let Some(svc) = self.service_at(target) {
            return Resolution::Service(self.service(svc, target, trust_domain));
        }
        if let Some(pod) = self.pod_at(target.ip()) {
            return Resolution::Pod(pod_endpoint(pod, target, trust_domain));
        }
        Resolution::Unknown(pb::Unknown {})
    }

    /// The Service whose cluster IP and port are `target`. Should two claim it
    /// (an IP reused before the old Service's deletion was seen), the first by
    /// namespace/name wins, so every replica answers alike.
    fn service_at(&self, target: SocketAddr) -> Option<(&ServiceRecord, &str)> {
        self.vips.get(&target.ip())?.iter().find_map(|key| {
            let svc = self.services.get(key)?;
            let port = svc.ports.iter().find(|p| p.port == target.port())?;
            Some((svc.as_ref(), port.name.as_str()))
        })
    }

    fn pod_at(&self, ip: IpAddr) -> Option<&PodRecord> {
        let keys = self.pods_by_ip.get(&ip)?;
        // Prefer a ready Pod should a stale one still claim the IP.
        let mut pods = keys.iter().filter_map(|k| self.pods.get(k));
        let first = pods.clone().next()?;
        Some(pods.find(|p| p.ready).unwrap_or(first))
    }

    fn service(&self, (svc, port_name): (&ServiceRecord, &str), target: SocketAddr, td: &str) -> pb::Service {
        let key = format!("{}:{}", svc.key, target.port());
        // Endpoints by address and port: slices may overlap while the
        // EndpointSlice controller moves endpoints between them.
        let mut ready: BTreeMap<(IpAddr, u16), pb::Endpoint> = BTreeMap::new();
        let mut serving_terminating: BTreeMap<(IpAddr, u16), pb::Endpoint> = BTreeMap::new();
        let slices = self.slices_by_service.get(&svc.key).into_iter().flatten();
        for slice in slices.filter_map(|k| self.slices.get(k)) {
            // A dual-stack Service has one family of slices per cluster IP family.
            if slice.ipv6 != target.is_ipv6() {
                continue;
            }
            let Some(port) = slice.ports.iter().find(|p| p.name == port_name).map(|p| p.port) else {
                continue;
            };
            for ep in &slice.endpoints {
                let at = (ep.address, port);
                if ep.ready {
                    ready.insert(at, self.endpoint(ep.address, port, ep.pod.as_ref(), true, td));
                } else if ep.serving && ep.terminating {
                    serving_terminating.insert(at, self.endpoint(ep.address, port, ep.pod.as_ref(), false, td));
                }
            }
        }
        // kube-proxy's rule: terminating-but-serving endpoints only when none is ready.
        let endpoints = if ready.is_empty() {
            serving_terminating.into_values().collect()
        } else {
            ready.into_values().collect()
        };
        pb::Service {
            name: svc.key.name.clone(),
            namespace: svc.key.namespace.clone(),
            port: u32::from(target.port()),
            opaque: svc.opaque_ports.contains(target.port()),
            default_backend: Some(pb::Backend { key, endpoints }),
            routes: Vec::new(),
            retry_budget: Some(pb::RetryBudget {
                ratio: svc.budget_ratio.unwrap_or(DEFAULT_BUDGET_RATIO),
                min_retries_per_second: DEFAULT_MIN_RETRIES_PER_SECOND,
                window: Some(prost_types::Duration {
                    seconds: DEFAULT_BUDGET_WINDOW_SECONDS,
                    nanos: 0,
                }),
            }),
            backends: Vec::new(),
        }
    }

    fn endpoint(&self, address: IpAddr, port: u16, pod: Option<&Key>, ready: bool, td: &str) -> pb::Endpoint {
        let record = pod.and_then(|k| self.pods.get(k));
        let (identity, meshed) = record.map(|p| identity(p, td)).unwrap_or_default();
        pb::Endpoint {
            address: address.to_string(),
            port: u32::from(port),
            identity,
            meshed,
            pod: pod.map(|k| k.name.clone()).unwrap_or_default(),
            ready,
            opaque: false,
        }
    }
}

/// The SPIFFE ID a meshed Pod's proxy presents, and whether it is meshed. A
/// Pod whose identity cannot be formed is treated as not meshed: without an
/// expected identity a proxy cannot verify it.
fn identity(pod: &PodRecord, td: &str) -> (String, bool) {
    if !pod.meshed {
        return (String::new(), false);
    }
    match SpiffeId::new(td, &pod.key.namespace, &pod.service_account) {
        Ok(id) => (id.to_string(), true),
        Err(e) => {
            tracing::warn!(pod = %pod.key, error = %e, "meshed Pod without a valid identity; treating it as not meshed");
            (String::new(), false)
        }
    }
}

fn pod_endpoint(pod: &PodRecord, target: SocketAddr, td: &str) -> pb::Endpoint {
    let (identity, meshed) = identity(pod, td);
    pb::Endpoint {
        address: target.ip().to_string(),
        port: u32::from(target.port()),
        identity,
        meshed,
        pod: pod.key.name.clone(),
        ready: pod.ready,
        opaque: pod.opaque_ports.contains(target.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{PortSet, ServicePort, SliceEndpoint, SlicePort};

    const TD: &str = "cluster.local";

    fn svc(name: &str, ip: &str, ports: &[(&str, u16)]) -> Record {
        Record::Service(ServiceRecord {
            key: Key::new("default", name),
            cluster_ips: vec![ip.parse().unwrap()],
            ports: ports
                .iter()
                .map(|(n, p)| ServicePort {
                    name: (*n).into(),
                    port: *p,
                })
                .collect(),
            opaque_ports: PortSet::parse("5432", |_| None).0,
            budget_ratio: None,
        })
    }

    fn ep(ip: &str, pod: &str, ready: bool, terminating: bool) -> SliceEndpoint {
        SliceEndpoint {
            address: ip.parse().unwrap(),
            ready,
            serving: true,
            terminating,
            pod: Some(Key::new("default", pod)),
        }
    }

    fn slice(name: &str, svc: &str, ports: &[(&str, u16)], endpoints: Vec<SliceEndpoint>) -> Record {
        Record::Slice(SliceRecord {
            key: Key::new("default", name),
            service: Some(Key::new("default", svc)),
            ipv6: false,
            ports: ports
                .iter()
                .map(|(n, p)| SlicePort {
                    name: (*n).into(),
                    port: *p,
                })
                .collect(),
            endpoints,
        })
    }

    fn pod(name: &str, ip: &str, sa: &str, meshed: bool) -> Record {
        Record::Pod(PodRecord {
            key: Key::new("default", name),
            ips: vec![ip.parse().unwrap()],
            service_account: sa.into(),
            meshed,
            ready: true,
            opaque_ports: PortSet::default(),
        })
    }

    fn endpoints(r: &Resolution) -> Vec<(String, u32, String, bool)> {
        let Resolution::Service(s) = r else {
            panic!("not a service: {r:?}")
        };
        s.default_backend
            .iter()
            .flat_map(|b| b.endpoints.iter())
            .map(|e| (e.address.clone(), e.port, e.identity.clone(), e.ready))
            .collect()
    }

    #[test]
    fn service_port_maps_to_slice_port_by_name_with_identities() {
        let mut ix = Index::new();
        ix.upsert(svc("web", "10.96.0.10", &[("http", 80), ("admin", 81)]));
        ix.upsert(slice(
            "web-1",
            "web",
            &[("http", 8080), ("admin", 9000)],
            vec![
                ep("10.0.0.1", "web-a", true, false),
                ep("10.0.0.2", "web-b", false, false),
            ],
        ));
        ix.upsert(pod("web-a", "10.0.0.1", "web", true));
        ix.upsert(pod("web-b", "10.0.0.2", "", true));
        let r = ix.resolve("10.96.0.10:80".parse().unwrap(), TD);
        assert_eq!(
            endpoints(&r),
            vec![(
                "10.0.0.1".into(),
                8080,
                "spiffe://cluster.local/ns/default/sa/web".into(),
                true
            )]
        );
        let r = ix.resolve("10.96.0.10:81".parse().unwrap(), TD);
        assert_eq!(endpoints(&r)[0].1, 9000);
        // Unserved port on a cluster IP, and an unknown address.
        assert_eq!(
            ix.resolve("10.96.0.10:82".parse().unwrap(), TD),
            Resolution::Unknown(pb::Unknown {})
        );
        assert_eq!(
            ix.resolve("192.0.2.1:80".parse().unwrap(), TD),
            Resolution::Unknown(pb::Unknown {})
        );
        // Pod IP, any port.
        let Resolution::Pod(p) = ix.resolve("10.0.0.1:7777".parse().unwrap(), TD) else {
            panic!("pod")
        };
        assert_eq!(p.identity, "spiffe://cluster.local/ns/default/sa/web");
        assert!(p.meshed);
        assert_eq!(p.port, 7777);
    }

    #[test]
    fn terminating_endpoints_only_when_none_ready_and_opaque_and_removal() {
        let mut ix = Index::new();
        ix.upsert(svc("db", "10.96.0.20", &[("", 5432)]));
        ix.upsert(slice(
            "db-1",
            "db",
            &[("", 5432)],
            vec![ep("10.0.0.5", "db-0", false, true)],
        ));
        let r = ix.resolve("10.96.0.20:5432".parse().unwrap(), TD);
        assert_eq!(endpoints(&r), vec![("10.0.0.5".into(), 5432, String::new(), false)]);
        let Resolution::Service(s) = &r else { panic!() };
        assert!(s.opaque);
        ix.remove(Kind::Service, &Key::new("default", "db"));
        assert_eq!(
            ix.resolve("10.96.0.20:5432".parse().unwrap(), TD),
            Resolution::Unknown(pb::Unknown {})
        );
        ix.replace_kind(Kind::EndpointSlice, Vec::new());
        assert_eq!(ix.len(Kind::EndpointSlice), 0);
    }
}
