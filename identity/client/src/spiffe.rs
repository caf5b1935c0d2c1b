//! SPIFFE IDs as sidemesh uses them: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a sidemesh SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{value:?} is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>: {reason}"
)]
pub struct SpiffeIdError {
    value: String,
    reason: &'static str,
}

/// A workload identity: trust domain, namespace and ServiceAccount.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an ID from its parts, checking each.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, SpiffeIdError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain (`cluster.local` by default).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes ServiceAccount.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

/// A Kubernetes name segment (DNS-1123 subdomain characters).
fn is_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let err = |reason| SpiffeIdError {
            value: value.chars().take(300).collect(),
            reason,
        };
        let rest = value
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("it must start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| err("it has no path"))?;
        if !is_trust_domain(td) {
            return Err(err(
                "the trust domain may hold only lowercase letters, digits, '-', '.', '_'",
            ));
        }
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err("the path must be /ns/<namespace>/sa/<serviceaccount>"));
        };
        if !is_k8s_name(ns) || !is_k8s_name(sa) {
            return Err(err("namespace and serviceaccount must be Kubernetes names"));
        }
        Ok(Self {
            trust_domain: td.to_owned(),
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/frontend".parse().unwrap();
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "frontend");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/frontend");
        assert_eq!(SpiffeId::new("cluster.local", "default", "frontend").unwrap(), id);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} accepted");
        }
    }
}
