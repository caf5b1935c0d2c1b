//! Endpoints as the data path uses them: address and identity parsed once,
//! when discovery delivers them, instead of on every request.

use std::net::SocketAddr;

use opentelemetry::KeyValue;
use sidemesh_identity_client::SpiffeId;
use sidemesh_proto::destination::v1 as pb;

/// One endpoint of a Service backend, or a Pod target.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Where to connect; `None` when the address sent does not parse, or the
    /// endpoint is meshed and its identity does not (fail closed: it is then
    /// never picked, rather than sent plaintext).
    pub addr: Option<SocketAddr>,
    /// The SPIFFE ID a meshed endpoint must present; `None` when not meshed.
    pub identity: Option<SpiffeId>,
    /// The `destination_workload` metric attribute of requests to it: its
    /// identity when meshed, `""` otherwise.
    pub workload: KeyValue,
    /// As received (for `/debug/state`).
    pub raw: pb::Endpoint,
}

impl From<pb::Endpoint> for Endpoint {
    fn from(raw: pb::Endpoint) -> Self {
        let workload = crate::telemetry::workload("destination_workload", Self::workload_id(&raw));
        Self::with_workload(raw, workload)
    }
}

impl Endpoint {
    /// The identity its `destination_workload` attribute carries.
    pub fn workload_id(raw: &pb::Endpoint) -> &str {
        if raw.meshed { &raw.identity } else { "" }
    }

    /// Parses `raw`, with its `destination_workload` attribute made by the
    /// caller (a Service's endpoints share one per identity).
    pub fn with_workload(raw: pb::Endpoint, workload: KeyValue) -> Self {
        let mut addr = match (raw.address.parse(), u16::try_from(raw.port)) {
            (Ok(ip), Ok(port)) => Some(SocketAddr::new(ip, port)),
            _ => None,
        };
        let identity = if raw.meshed { raw.identity.parse().ok() } else { None };
        if raw.meshed && identity.is_none() {
            addr = None;
        }
        Self {
            addr,
            identity,
            workload,
            raw,
        }
    }

    /// Logs why it can take no traffic, if it cannot. Parsing is silent because
    /// discovery resends a Service's every endpoint on each change to any of
    /// them: the caller logs only what the previous update did not have.
    pub fn warn_if_unusable(&self) {
        if self.addr.is_some() {
            return;
        }
        let raw = &self.raw;
        match raw.identity.parse::<SpiffeId>() {
            Err(e) if raw.meshed => tracing::warn!(
                identity = %raw.identity, address = %raw.address, error = %e,
                "discovery sent a meshed endpoint whose identity does not parse; it takes no traffic"
            ),
            _ => tracing::warn!(address = %raw.address, port = raw.port, "discovery sent an unusable endpoint address"),
        }
    }

    /// Whether it may take traffic (see the `ready` field of the wire format).
    pub fn ready(&self) -> bool {
        self.raw.ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(address: &str, port: u32, identity: &str, meshed: bool) -> pb::Endpoint {
        pb::Endpoint {
            address: address.into(),
            port,
            identity: identity.into(),
            meshed,
            ready: true,
            ..Default::default()
        }
    }

    #[test]
    fn address_and_identity_are_parsed_once_and_bad_ones_are_unusable() {
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let ep = Endpoint::from(raw("10.1.2.3", 8080, id, true));
        assert_eq!(ep.addr, Some("10.1.2.3:8080".parse().unwrap()));
        assert_eq!(ep.identity.as_ref().map(ToString::to_string).as_deref(), Some(id));
        assert!(ep.ready());
        let v6 = Endpoint::from(raw("fd00::1", 80, "", false));
        assert_eq!(v6.addr, Some("[fd00::1]:80".parse().unwrap()));
        // An identity counts only for a meshed endpoint.
        assert_eq!(Endpoint::from(raw("10.1.2.3", 80, id, false)).identity, None);
        let unverifiable = Endpoint::from(raw("10.1.2.3", 80, "spiffe://x", true));
        assert_eq!((unverifiable.identity, unverifiable.addr), (None, None), "never picked");
        assert_eq!(Endpoint::from(raw("10.1.2.300", 80, "", false)).addr, None);
        assert_eq!(Endpoint::from(raw("10.1.2.3", 70_000, "", false)).addr, None);
        assert_eq!(Endpoint::from(raw("", 80, "", false)).addr, None);
    }
}
