//! The index: records of Services, EndpointSlices, Pods and HTTPRoutes, with
//! the reverse maps that answer "what is `ip:port`?" (and which routes attach
//! to it) without scanning. Pure data, no I/O; [`crate::indexer`] runs it and
//! tells subscribers about changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use sidemesh_identity_client::SpiffeId;
use sidemesh_proto::destination::v1 as pb;

use crate::objects::{Key, Kind, PodRecord, Record, ServicePort, ServiceRecord, SliceRecord};
use crate::route::{BackendTarget, Condition, ParentStatus, RouteRecord, RouteStatus};

/// Retry budget defaults (DESIGN.md): 20% extra load over 10 s, plus 10 retries/s.
pub const DEFAULT_BUDGET_RATIO: f64 = 0.2;
/// Retries always allowed per second, whatever the ratio.
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
/// Window over which the ratio is measured.
pub const DEFAULT_BUDGET_WINDOW_SECONDS: i64 = 10;

/// What an address resolves to (the `result` of a `DiscoveryResponse`).
pub type Resolution = pb::discovery_response::Result;

/// The routes of one group (producer or one consumer namespace) for a
/// Service port, and the backends they reference.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteSet {
    /// `Service.routes`.
    pub routes: Vec<pb::Route>,
    /// `Service.backends`.
    pub backends: Vec<pb::Backend>,
}

/// Consumer routes by client namespace: a client in one of these namespaces
/// gets that set instead of the producer routes in the [`Resolution`].
pub type Consumers = BTreeMap<String, RouteSet>;

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
    routes: HashMap<Key, Arc<RouteRecord>>,
    /// Service → the routes naming it as a parent.
    routes_by_parent: HashMap<Key, BTreeSet<Key>>,
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
            Kind::HttpRoute => self.routes.len(),
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
            Record::Route(r) => {
                for parent in &r.parents {
                    self.routes_by_parent
                        .entry(parent.service.clone())
                        .or_default()
                        .insert(key.clone());
                }
                self.routes.insert(key, Arc::new(r));
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
            Kind::HttpRoute => {
                if let Some(old) = self.routes.remove(key) {
                    for parent in &old.parents {
                        unlink(&mut self.routes_by_parent, parent.service.clone(), key);
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
            Kind::HttpRoute => {
                self.routes.clear();
                self.routes_by_parent.clear();
            }
        }
        for r in records.into_iter().filter(|r| r.kind() == kind) {
            self.upsert(r);
        }
    }

    /// Resolves an original destination for a proxy in `trust_domain`, as
    /// clients without consumer routes see it.
    pub fn resolve(&self, target: SocketAddr, trust_domain: &str) -> Resolution {
        self.resolve_with_consumers(target, trust_domain).0
    }

    /// Resolves an original destination, with the consumer routes of each
    /// namespace that has some for it.
    pub fn resolve_with_consumers(&self, target: SocketAddr, trust_domain: &str) -> (Resolution, Consumers) {
        if let Some(svc) = self.service_at(target) {
            let (svc, consumers) = self.service(svc, target, trust_domain);
            return (Resolution::Service(svc), consumers);
        }
        if let Some(pod) = self.pod_at(target.ip()) {
            return (
                Resolution::Pod(pod_endpoint(pod, target, trust_domain)),
                Consumers::new(),
            );
        }
        (Resolution::Unknown(pb::Unknown {}), Consumers::new())
    }

    /// The Service whose cluster IP and port are `target`. Should two claim it
    /// (an IP reused before the old Service's deletion was seen), the first by
    /// namespace/name wins, so every replica answers alike.
    fn service_at(&self, target: SocketAddr) -> Option<(&ServiceRecord, &ServicePort)> {
        self.vips.get(&target.ip())?.iter().find_map(|key| {
            let svc = self.services.get(key)?;
            let port = svc.ports.iter().find(|p| p.port == target.port())?;
            Some((svc.as_ref(), port))
        })
    }

    fn pod_at(&self, ip: IpAddr) -> Option<&PodRecord> {
        let keys = self.pods_by_ip.get(&ip)?;
        // Prefer a ready Pod should a stale one still claim the IP.
        let mut pods = keys.iter().filter_map(|k| self.pods.get(k));
        let first = pods.clone().next()?;
        Some(pods.find(|p| p.ready).unwrap_or(first))
    }

    fn service(
        &self,
        (svc, port): (&ServiceRecord, &ServicePort),
        target: SocketAddr,
        td: &str,
    ) -> (pb::Service, Consumers) {
        let key = format!("{}:{}", svc.key, target.port());
        let endpoints = self.endpoints(&svc.key, &port.name, target.is_ipv6(), td);
        let (producer, consumers) = self.routes_for(svc, port, &key, target.is_ipv6(), td);
        let svc = pb::Service {
            name: svc.key.name.clone(),
            namespace: svc.key.namespace.clone(),
            port: u32::from(target.port()),
            opaque: svc.opaque_ports.contains(target.port()),
            default_backend: Some(pb::Backend {
                key,
                endpoints,
                unresolved: false,
            }),
            routes: producer.routes,
            retry_budget: Some(pb::RetryBudget {
                ratio: svc.budget_ratio.unwrap_or(DEFAULT_BUDGET_RATIO),
                min_retries_per_second: DEFAULT_MIN_RETRIES_PER_SECOND,
                window: Some(prost_types::Duration {
                    seconds: DEFAULT_BUDGET_WINDOW_SECONDS,
                    nanos: 0,
                }),
            }),
            backends: producer.backends,
        };
        (svc, consumers)
    }

    /// The endpoints of Service `svc`'s port named `port_name`, of one address family.
    fn endpoints(&self, svc: &Key, port_name: &str, ipv6: bool, td: &str) -> Vec<pb::Endpoint> {
        // Endpoints by address and port: slices may overlap while the
        // EndpointSlice controller moves endpoints between them.
        let mut ready: BTreeMap<(IpAddr, u16), pb::Endpoint> = BTreeMap::new();
        let mut serving_terminating: BTreeMap<(IpAddr, u16), pb::Endpoint> = BTreeMap::new();
        let slices = self.slices_by_service.get(svc).into_iter().flatten();
        for slice in slices.filter_map(|k| self.slices.get(k)) {
            // A dual-stack Service has one family of slices per cluster IP family.
            if slice.ipv6 != ipv6 {
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
        if ready.is_empty() {
            serving_terminating.into_values().collect()
        } else {
            ready.into_values().collect()
        }
    }

    /// The routes attached to a Service port: producer routes (in the
    /// Service's namespace) and consumer routes by namespace (GAMMA: a
    /// consumer route only affects clients in its own namespace, and replaces
    /// the producer routes for them). Within a group, Gateway API's
    /// tie-break order: oldest first, then `namespace/name`, then rule index.
    fn routes_for(
        &self,
        svc: &ServiceRecord,
        port: &ServicePort,
        default_key: &str,
        ipv6: bool,
        td: &str,
    ) -> (RouteSet, Consumers) {
        let mut groups: BTreeMap<&str, Vec<&RouteRecord>> = BTreeMap::new();
        for key in self.routes_by_parent.get(&svc.key).into_iter().flatten() {
            let Some(route) = self.routes.get(key) else {
                continue;
            };
            // A route whose every rule is invalid is not accepted: it does not attach.
            if route.rules.is_empty() {
                continue;
            }
            if route
                .parents
                .iter()
                .any(|p| p.service == svc.key && p.attaches(port.port, &port.name))
            {
                groups.entry(route.key.namespace.as_str()).or_default().push(route);
            }
        }
        let mut producer = RouteSet::default();
        let mut consumers = Consumers::new();
        for (ns, mut routes) in groups {
            routes.sort_by_cached_key(|r| (r.created.unwrap_or(i64::MIN), r.key.to_string()));
            let set = self.route_set(&routes, default_key, ipv6, td);
            if ns == svc.key.namespace {
                producer = set;
            } else {
                consumers.insert(ns.to_owned(), set);
            }
        }
        (producer, consumers)
    }

    fn route_set(&self, routes: &[&RouteRecord], default_key: &str, ipv6: bool, td: &str) -> RouteSet {
        let mut targets: BTreeMap<String, &BackendTarget> = BTreeMap::new();
        let mut out = Vec::new();
        for route in routes {
            for rule in &route.rules {
                let backends = if rule.backends.is_empty() {
                    // No backendRefs: the Service itself (a rule that only
                    // sets timeouts or retries, as in GAMMA's examples).
                    vec![pb::WeightedBackend {
                        key: default_key.to_owned(),
                        weight: 1,
                    }]
                } else {
                    rule.backends
                        .iter()
                        .map(|b| {
                            let key = b.target.key();
                            if key != default_key {
                                targets.entry(key.clone()).or_insert(&b.target);
                            }
                            pb::WeightedBackend { key, weight: b.weight }
                        })
                        .collect()
                };
                out.push(pb::Route {
                    name: route.key.to_string(),
                    rule: rule.index,
                    matches: rule.matches.clone(),
                    backends,
                    request_timeout: rule.request_timeout,
                    backend_request_timeout: rule.backend_request_timeout,
                    retry: rule.retry.clone(),
                    rule_name: rule.name.clone(),
                });
            }
        }
        let backends = targets
            .into_iter()
            .map(|(key, target)| self.backend(key, target, ipv6, td))
            .collect();
        RouteSet { routes: out, backends }
    }

    /// A backendRef's endpoints, built as the default backend's are.
    fn backend(&self, key: String, target: &BackendTarget, ipv6: bool, td: &str) -> pb::Backend {
        let port = match target {
            BackendTarget::Service { service, port } => self
                .services
                .get(service)
                .and_then(|s| s.ports.iter().find(|p| p.port == *port))
                .map(|p| (service, p.name.as_str())),
            BackendTarget::Other { .. } => None,
        };
        match port {
            Some((service, port_name)) => pb::Backend {
                key,
                endpoints: self.endpoints(service, port_name, ipv6, td),
                unresolved: false,
            },
            None => pb::Backend {
                key,
                endpoints: Vec::new(),
                unresolved: true,
            },
        }
    }

    /// Why a backendRef does not resolve, if it does not.
    fn unresolved(&self, target: &BackendTarget) -> Option<(&'static str, &'static str, String)> {
        match target {
            BackendTarget::Service { service, port } => match self.services.get(service) {
                None => Some((
                    "backend_not_found",
                    "BackendNotFound",
                    format!("Service {service} not found"),
                )),
                Some(s) if !s.ports.iter().any(|p| p.port == *port) => Some((
                    "backend_not_found",
                    "BackendNotFound",
                    format!("Service {service} has no TCP port {port}"),
                )),
                Some(_) => None,
            },
            BackendTarget::Other { kind, group, object } => Some((
                "invalid_kind",
                "InvalidKind",
                format!("{kind} {object} (group {group:?}) is not a Service"),
            )),
        }
    }

    /// Each route's problems and the `status.parents` entries sidemesh owns
    /// (routes with a Service parent, or with an entry of ours to remove).
    pub fn route_statuses(&self) -> BTreeMap<Key, RouteStatus> {
        let mut out = BTreeMap::new();
        for route in self.routes.values() {
            let ours_present = route
                .status_parents
                .iter()
                .any(|v| v["controllerName"] == crate::route::CONTROLLER_NAME);
            if route.parents.is_empty() && !ours_present {
                continue;
            }
            let mut problems: Vec<(&'static str, String)> = route
                .dropped
                .iter()
                .map(|d| (d.reason, format!("rule {}: {}", d.rule, d.message)))
                .collect();
            let mut refs: Option<(&'static str, String)> = None;
            for rule in &route.rules {
                for b in &rule.backends {
                    if let Some((metric, reason, message)) = self.unresolved(&b.target) {
                        problems.push((metric, format!("rule {}: {message}", rule.index)));
                        // InvalidKind outranks BackendNotFound in the one condition there is.
                        if refs
                            .as_ref()
                            .is_none_or(|(r, _)| *r == "BackendNotFound" && reason == "InvalidKind")
                        {
                            refs = Some((reason, format!("rule {}: {message}", rule.index)));
                        }
                    }
                }
                if rule.ignored_filters {
                    problems.push((
                        "filters_ignored",
                        format!("rule {}: filters are not applied by sidemesh", rule.index),
                    ));
                }
            }
            let dropped_msg = route
                .dropped
                .iter()
                .map(|d| format!("{}: {}", d.rule, d.message))
                .collect::<Vec<_>>()
                .join("; ");
            let mut parents = Vec::new();
            for parent in &route.parents {
                let svc = self.services.get(&parent.service);
                let missing = match svc {
                    None => Some(format!("Service {} not found", parent.service)),
                    Some(s) if !s.ports.iter().any(|p| parent.attaches(p.port, &p.name)) => {
                        Some(format!("Service {} has no matching TCP port", parent.service))
                    }
                    Some(_) => None,
                };
                let accepted = if let Some(m) = missing {
                    problems.push(("no_matching_parent", m.clone()));
                    Condition {
                        kind: "Accepted",
                        status: false,
                        reason: "NoMatchingParent",
                        message: m,
                    }
                } else if route.rules.is_empty() {
                    Condition {
                        kind: "Accepted",
                        status: false,
                        reason: "UnsupportedValue",
                        message: format!("All rules are invalid: {dropped_msg}"),
                    }
                } else {
                    Condition {
                        kind: "Accepted",
                        status: true,
                        reason: "Accepted",
                        message: "Route attached to the Service".to_owned(),
                    }
                };
                let mut conditions = vec![accepted];
                conditions.push(match &refs {
                    Some((reason, message)) => Condition {
                        kind: "ResolvedRefs",
                        status: false,
                        reason,
                        message: message.clone(),
                    },
                    None => Condition {
                        kind: "ResolvedRefs",
                        status: true,
                        reason: "ResolvedRefs",
                        message: "All references resolved".to_owned(),
                    },
                });
                if !route.dropped.is_empty() && !route.rules.is_empty() {
                    conditions.push(Condition {
                        kind: "PartiallyInvalid",
                        status: true,
                        reason: "UnsupportedValue",
                        message: format!("Dropped Rule(s) {dropped_msg}"),
                    });
                }
                parents.push(ParentStatus {
                    parent_ref: parent.echo.clone(),
                    conditions,
                });
            }
            if route.parents.is_empty() {
                problems.clear();
            }
            out.insert(
                route.key.clone(),
                RouteStatus {
                    generation: route.generation,
                    resource_version: route.resource_version.clone(),
                    parents,
                    problems,
                    current: route.status_parents.clone(),
                },
            );
        }
        out
    }

    /// Services whose annotation value is ignored as invalid, by annotation.
    pub fn invalid_annotations(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for svc in self.services.values() {
            for a in &svc.invalid_annotations {
                *out.entry(*a).or_default() += 1;
            }
        }
        out
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
            invalid_annotations: Vec::new(),
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

    fn route(ns: &str, name: &str, created: i64, yaml: &str) -> Record {
        let mut route: crate::route::HttpRoute = serde_saphyr::from_str(yaml).unwrap();
        route.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        Record::Route(crate::route::record(&route, Key::new(ns, name)))
    }

    #[test]
    fn routes_ordered_with_backends_consumers_and_statuses() {
        let mut ix = Index::new();
        ix.upsert(svc("web", "10.96.0.10", &[("http", 80), ("admin", 81)]));
        ix.upsert(slice(
            "web-1",
            "web",
            &[("http", 8080)],
            vec![ep("10.0.0.1", "web-a", true, false)],
        ));
        ix.upsert(svc("canary", "10.96.0.11", &[("http", 80)]));
        ix.upsert(slice(
            "canary-1",
            "canary",
            &[("http", 8080)],
            vec![ep("10.0.0.2", "c-a", true, false)],
        ));
        ix.upsert(pod("c-a", "10.0.0.2", "canary", true));
        let split = "spec: { parentRefs: [{ kind: Service, name: web, port: 80 }], rules: [{ backendRefs: [{ name: web, port: 80, weight: 9 }, { name: canary, port: 80, weight: 1 }, { name: gone, port: 80 }] }, { matches: [{ path: { type: RegularExpression, value: '(' } }] }] }";
        // Newer but alphabetically first: the older route comes first.
        ix.upsert(route("default", "b-split", 100, split));
        ix.upsert(route(
            "default",
            "a-timeouts",
            200,
            "spec: { parentRefs: [{ kind: Service, name: web }], rules: [{ timeouts: { request: 1s } }] }",
        ));
        ix.upsert(route(
            "client",
            "consumer",
            300,
            "spec: { parentRefs: [{ kind: Service, name: web, namespace: default }], rules: [{ retry: { attempts: 2 } }] }",
        ));
        let (r, consumers) = ix.resolve_with_consumers("10.96.0.10:80".parse().unwrap(), TD);
        let Resolution::Service(s) = &r else { panic!("{r:?}") };
        let names: Vec<(&str, u32)> = s.routes.iter().map(|r| (r.name.as_str(), r.rule)).collect();
        assert_eq!(names, vec![("default/b-split", 0), ("default/a-timeouts", 0)]);
        let weights: Vec<(&str, u32)> = s.routes[0]
            .backends
            .iter()
            .map(|b| (b.key.as_str(), b.weight))
            .collect();
        assert_eq!(
            weights,
            vec![("default/web:80", 9), ("default/canary:80", 1), ("default/gone:80", 1)]
        );
        assert_eq!(
            s.routes[1].backends[0].key, "default/web:80",
            "no backendRefs: the Service itself"
        );
        let backends: Vec<(&str, usize, bool)> = s
            .backends
            .iter()
            .map(|b| (b.key.as_str(), b.endpoints.len(), b.unresolved))
            .collect();
        assert_eq!(
            backends,
            vec![("default/canary:80", 1, false), ("default/gone:80", 0, true)]
        );
        assert_eq!(
            s.backends[0].endpoints[0].identity,
            "spiffe://cluster.local/ns/default/sa/canary"
        );
        assert_eq!(consumers.len(), 1);
        assert_eq!(consumers["client"].routes[0].retry.as_ref().unwrap().attempts, 3);
        // Port 81: only the route without a port attaches (and the consumer one).
        let Resolution::Service(s81) = ix.resolve("10.96.0.10:81".parse().unwrap(), TD) else {
            panic!()
        };
        assert_eq!(s81.routes.len(), 1);
        assert_eq!(s81.routes[0].backends[0].key, "default/web:81");

        let statuses = ix.route_statuses();
        let split = &statuses[&Key::new("default", "b-split")];
        let reasons: Vec<&str> = split.problems.iter().map(|p| p.0).collect();
        assert_eq!(reasons, vec!["bad_regex", "backend_not_found"]);
        let conds: Vec<(&str, bool, &str)> = split.parents[0]
            .conditions
            .iter()
            .map(|c| (c.kind, c.status, c.reason))
            .collect();
        assert_eq!(
            conds,
            vec![
                ("Accepted", true, "Accepted"),
                ("ResolvedRefs", false, "BackendNotFound"),
                ("PartiallyInvalid", true, "UnsupportedValue")
            ]
        );
        // A backend Service appearing resolves the reference.
        ix.upsert(svc("gone", "10.96.0.12", &[("http", 80)]));
        let statuses = ix.route_statuses();
        assert_eq!(
            statuses[&Key::new("default", "b-split")].parents[0].conditions[1].reason,
            "ResolvedRefs"
        );
        ix.remove(Kind::Service, &Key::new("default", "web"));
        let statuses = ix.route_statuses();
        assert_eq!(
            statuses[&Key::new("default", "a-timeouts")].parents[0].conditions[0].reason,
            "NoMatchingParent"
        );
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
