//! The Kubernetes objects the destination service reads, and the small
//! records it keeps of them. Both sources (the API server's watches and the
//! YAML file) hand typed objects (`k8s-openapi`, and [`crate::route`] for
//! HTTPRoute) to [`Record::from_object`], so there is one interpretation of a
//! Service, an EndpointSlice, a Pod or an HTTPRoute.
//!
//! Only what discovery needs is kept: a Pod object is several kilobytes, its
//! record a few dozen bytes, and a cluster-wide Pod watch holds every Pod.

use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::route::{HttpRoute, RouteRecord};

/// Pod annotation the injector sets on every Pod it gave a proxy.
pub const INJECTED_ANNOTATION: &str = "sidemesh.io/injected";
/// Service (and Pod) annotation listing ports proxied as plain TCP.
pub const OPAQUE_PORTS_ANNOTATION: &str = "config.sidemesh.io/opaque-ports";
/// Service annotation overriding the retry budget's ratio.
pub const BUDGET_RATIO_ANNOTATION: &str = "retry.sidemesh.io/budget-ratio";
/// EndpointSlice label naming the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The kinds of object indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1/Service`.
    Service,
    /// `discovery.k8s.io/v1/EndpointSlice`.
    EndpointSlice,
    /// `v1/Pod`.
    Pod,
    /// `gateway.networking.k8s.io/v1/HTTPRoute`.
    HttpRoute,
}

impl Kind {
    /// All indexed kinds.
    pub const ALL: [Kind; 4] = [Kind::Service, Kind::EndpointSlice, Kind::Pod, Kind::HttpRoute];

    /// The name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::HttpRoute => "HTTPRoute",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespaced object name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Namespace (`default` when an object in a file names none).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl Key {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A typed object from a source.
#[derive(Debug, Clone)]
pub enum Object {
    /// A Service.
    Service(Box<Service>),
    /// An EndpointSlice.
    EndpointSlice(Box<EndpointSlice>),
    /// A Pod.
    Pod(Box<Pod>),
    /// An HTTPRoute.
    HttpRoute(Box<HttpRoute>),
}

impl From<Service> for Object {
    fn from(o: Service) -> Self {
        Object::Service(Box::new(o))
    }
}

impl From<EndpointSlice> for Object {
    fn from(o: EndpointSlice) -> Self {
        Object::EndpointSlice(Box::new(o))
    }
}

impl From<Pod> for Object {
    fn from(o: Pod) -> Self {
        Object::Pod(Box::new(o))
    }
}

impl From<HttpRoute> for Object {
    fn from(o: HttpRoute) -> Self {
        Object::HttpRoute(Box::new(o))
    }
}

/// A set of ports, as listed in an opaque-ports annotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= port && port <= hi)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses a comma list of port numbers, ranges (`4000-4100`) and port
    /// names (resolved through `named`). Entries that are none of these are
    /// returned as errors; the valid ones still count.
    pub fn parse<'a>(value: &str, named: impl Fn(&str) -> Option<u16> + 'a) -> (Self, Vec<String>) {
        let mut set = Vec::new();
        let mut bad = Vec::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let port = |s: &str| s.parse::<u16>().ok().filter(|p| *p != 0);
            let parsed = match entry.split_once('-') {
                Some((lo, hi)) => match (port(lo.trim()), port(hi.trim())) {
                    (Some(lo), Some(hi)) if lo <= hi => Some((lo, hi)),
                    _ => None,
                },
                None => port(entry).or_else(|| named(entry)).map(|p| (p, p)),
            };
            match parsed {
                Some(r) => set.push(r),
                None => bad.push(entry.chars().take(64).collect()),
            }
        }
        (Self(set), bad)
    }
}

/// A Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (empty for a single unnamed port).
    pub name: String,
    /// The port clients connect to.
    pub port: u16,
}

/// What is kept of a Service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    /// Namespace and name.
    pub key: Key,
    /// Cluster IPs (none for headless and ExternalName Services).
    pub cluster_ips: Vec<IpAddr>,
    /// TCP ports.
    pub ports: Vec<ServicePort>,
    /// Service ports proxied as plain TCP.
    pub opaque_ports: PortSet,
    /// Retry budget ratio override.
    pub budget_ratio: Option<f64>,
    /// Annotations whose value is ignored as invalid (for the metric).
    pub invalid_annotations: Vec<&'static str>,
}

/// An EndpointSlice port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// Name, matching the Service port's name.
    pub name: String,
    /// The port on the endpoints.
    pub port: u16,
}

/// One endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its address (the first of the endpoint's addresses).
    pub address: IpAddr,
    /// Ready to receive traffic (an unset condition counts as ready).
    pub ready: bool,
    /// Serving (defaults to `ready`).
    pub serving: bool,
    /// Terminating.
    pub terminating: bool,
    /// The Pod behind it, from `targetRef`.
    pub pod: Option<Key>,
}

/// What is kept of an EndpointSlice.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceRecord {
    /// Namespace and name.
    pub key: Key,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: Option<Key>,
    /// Whether its addresses are IPv6 (IPv4 otherwise; FQDN slices are not kept).
    pub ipv6: bool,
    /// TCP ports.
    pub ports: Vec<SlicePort>,
    /// Endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// What is kept of a Pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRecord {
    /// Namespace and name.
    pub key: Key,
    /// Pod IPs (none for host-network and finished Pods, whose IPs are not theirs).
    pub ips: Vec<IpAddr>,
    /// ServiceAccount (`default` when unset).
    pub service_account: String,
    /// Carries `sidemesh.io/injected`.
    pub meshed: bool,
    /// Its Ready condition.
    pub ready: bool,
    /// Ports it marks opaque.
    pub opaque_ports: PortSet,
}

/// An indexed object, reduced to what discovery needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A Service.
    Service(ServiceRecord),
    /// An EndpointSlice.
    Slice(SliceRecord),
    /// A Pod.
    Pod(PodRecord),
    /// An HTTPRoute.
    Route(RouteRecord),
}

/// Why an object cannot be indexed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} without metadata.name")]
pub struct RecordError {
    kind: Kind,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, kind: Kind) -> Result<Key, RecordError> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(RecordError { kind })?;
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    Ok(Key { namespace, name })
}

fn port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

impl Record {
    /// The kind of object it came from.
    pub fn kind(&self) -> Kind {
        match self {
            Record::Service(_) => Kind::Service,
            Record::Slice(_) => Kind::EndpointSlice,
            Record::Pod(_) => Kind::Pod,
            Record::Route(_) => Kind::HttpRoute,
        }
    }

    /// Its namespace and name.
    pub fn key(&self) -> &Key {
        match self {
            Record::Service(r) => &r.key,
            Record::Slice(r) => &r.key,
            Record::Pod(r) => &r.key,
            Record::Route(r) => &r.key,
        }
    }

    /// Reduces a typed object to its record. Annotation values that do not
    /// parse are logged and ignored: one bad annotation must not hide the
    /// object's endpoints.
    pub fn from_object(object: &Object) -> Result<Self, RecordError> {
        match object {
            Object::Service(s) => service_record(s).map(Record::Service),
            Object::EndpointSlice(s) => slice_record(s).map(Record::Slice),
            Object::Pod(p) => pod_record(p).map(Record::Pod),
            Object::HttpRoute(r) => {
                key_of(&r.metadata, Kind::HttpRoute).map(|key| Record::Route(crate::route::record(r, key)))
            }
        }
    }

    /// The key of a typed object (for deletions).
    pub fn key_of(object: &Object) -> Result<(Kind, Key), RecordError> {
        match object {
            Object::Service(s) => key_of(&s.metadata, Kind::Service).map(|k| (Kind::Service, k)),
            Object::EndpointSlice(s) => key_of(&s.metadata, Kind::EndpointSlice).map(|k| (Kind::EndpointSlice, k)),
            Object::Pod(p) => key_of(&p.metadata, Kind::Pod).map(|k| (Kind::Pod, k)),
            Object::HttpRoute(r) => key_of(&r.metadata, Kind::HttpRoute).map(|k| (Kind::HttpRoute, k)),
        }
    }
}

fn service_record(svc: &Service) -> Result<ServiceRecord, RecordError> {
    let key = key_of(&svc.metadata, Kind::Service)?;
    let spec = svc.spec.clone().unwrap_or_default();
    let mut ips: Vec<String> = spec.cluster_ips.unwrap_or_default();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip);
    }
    // "None" marks a headless Service; ExternalName Services have no IP.
    let cluster_ips = ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()).collect();
    let ports: Vec<ServicePort> = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.unwrap_or_default(),
                port: port(p.port)?,
            })
        })
        .collect();
    let annotations = svc.metadata.annotations.as_ref();
    let mut invalid_annotations = Vec::new();
    let opaque_ports = match annotations.and_then(|a| a.get(OPAQUE_PORTS_ANNOTATION)) {
        Some(v) => {
            let (set, bad) = PortSet::parse(v, |name| ports.iter().find(|p| p.name == name).map(|p| p.port));
            if !bad.is_empty() {
                invalid_annotations.push(OPAQUE_PORTS_ANNOTATION);
                tracing::warn!(service = %key, annotation = OPAQUE_PORTS_ANNOTATION, ?bad, "ignoring entries that are neither ports, ranges nor port names");
            }
            set
        }
        None => PortSet::default(),
    };
    let budget_ratio = annotations
        .and_then(|a| a.get(BUDGET_RATIO_ANNOTATION))
        .and_then(|v| match parse_ratio(v) {
            Some(r) => Some(r),
            None => {
                invalid_annotations.push(BUDGET_RATIO_ANNOTATION);
                tracing::warn!(service = %key, annotation = BUDGET_RATIO_ANNOTATION, value = %v.chars().take(64).collect::<String>(), "not a number >= 0; using the default ratio");
                None
            }
        });
    Ok(ServiceRecord {
        key,
        cluster_ips,
        ports,
        opaque_ports,
        budget_ratio,
        invalid_annotations,
    })
}

/// A retry budget ratio: a finite number >= 0 (`0.5` allows retries of up to
/// half the requests; `0` leaves only the per-second floor).
fn parse_ratio(v: &str) -> Option<f64> {
    v.trim().parse::<f64>().ok().filter(|r| r.is_finite() && *r >= 0.0)
}

fn slice_record(slice: &EndpointSlice) -> Result<SliceRecord, RecordError> {
    let key = key_of(&slice.metadata, Kind::EndpointSlice)?;
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
        .map(|s| Key::new(key.namespace.clone(), s.clone()));
    let ipv6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        // FQDN endpoints are not addresses a proxy can connect to by IP.
        _ => {
            return Ok(SliceRecord {
                key,
                service,
                ipv6: false,
                ports: Vec::new(),
                endpoints: Vec::new(),
            });
        }
    };
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| {
            Some(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                // An unset port means "all ports", which a Service never produces.
                port: port(p.port?)?,
            })
        })
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .filter_map(|ep| {
            // The addresses of one endpoint are fungible; consumers use the first.
            let address = ep.addresses.first()?.parse::<IpAddr>().ok()?;
            let conditions = ep.conditions.clone().unwrap_or_default();
            let ready = conditions.ready.unwrap_or(true);
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let name = r.name.clone().filter(|n| !n.is_empty())?;
                    let ns = r
                        .namespace
                        .clone()
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| key.namespace.clone());
                    Some(Key::new(ns, name))
                });
            Some(SliceEndpoint {
                address,
                ready,
                serving: conditions.serving.unwrap_or(ready),
                terminating: conditions.terminating.unwrap_or(false),
                pod,
            })
        })
        .collect();
    Ok(SliceRecord {
        key,
        service,
        ipv6,
        ports,
        endpoints,
    })
}

fn pod_record(pod: &Pod) -> Result<PodRecord, RecordError> {
    let key = key_of(&pod.metadata, Kind::Pod)?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let finished = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let mut ips = Vec::new();
    // A host-network Pod shares the node's IP and a finished Pod's IP may
    // already belong to another Pod: neither IP identifies this Pod.
    if !host_network
        && !finished
        && let Some(status) = status
    {
        let listed: Vec<&str> = match &status.pod_ips {
            Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.as_str()).collect(),
            _ => status.pod_ip.as_deref().into_iter().collect(),
        };
        ips.extend(listed.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()));
    }
    let service_account = spec
        .and_then(|s| s.service_account_name.clone().or_else(|| s.service_account.clone()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let annotations = pod.metadata.annotations.as_ref();
    let meshed = annotations.is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let opaque_ports = match annotations.and_then(|a| a.get(OPAQUE_PORTS_ANNOTATION)) {
        Some(v) => {
            let named = |name: &str| {
                spec.into_iter()
                    .flat_map(|s| s.containers.iter())
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|p| p.name.as_deref() == Some(name))
                    .and_then(|p| port(p.container_port))
            };
            let (set, bad) = PortSet::parse(v, named);
            if !bad.is_empty() {
                tracing::warn!(pod = %key, annotation = OPAQUE_PORTS_ANNOTATION, ?bad, "ignoring entries that are neither ports, ranges nor port names");
            }
            set
        }
        None => PortSet::default(),
    };
    Ok(PodRecord {
        key,
        ips,
        service_account,
        meshed,
        ready,
        opaque_ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_sets() {
        let named = |n: &str| (n == "mysql").then_some(3306);
        let (set, bad) = PortSet::parse(" 25, 4000-4002,mysql,,0,70000,9-1,x-y,redis ", named);
        assert!(set.contains(25) && set.contains(4001) && set.contains(3306));
        assert!(!set.contains(26) && !set.contains(4003));
        assert_eq!(bad, vec!["0", "70000", "9-1", "x-y", "redis"]);
    }

    #[test]
    fn budget_ratios() {
        assert_eq!(parse_ratio(" 0.5 "), Some(0.5));
        assert_eq!(parse_ratio("0"), Some(0.0));
        assert_eq!(parse_ratio("3"), Some(3.0));
        for bad in ["-0.1", "NaN", "inf", "half", ""] {
            assert_eq!(parse_ratio(bad), None, "{bad}");
        }
    }
}
