//! The annotations that steer injection, and the validation of every override
//! value. An override may sit on the Pod (or its template) or on its
//! Namespace; the Pod's value wins. An invalid value is never ignored: it is
//! reported with the annotation's name, where it was found and the bad value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Turns injection on (`enabled`) or off (`disabled`), on a Pod or Namespace.
pub const INJECT: &str = "sidemesh.io/inject";
/// Set on injected Pods; its presence means "never inject again".
pub const INJECTED: &str = "sidemesh.io/injected";
/// Inbound ports delivered straight to the application (comma list, ranges).
pub const SKIP_INBOUND_PORTS: &str = "config.sidemesh.io/skip-inbound-ports";
/// Outbound ports that bypass the proxy (comma list, ranges).
pub const SKIP_OUTBOUND_PORTS: &str = "config.sidemesh.io/skip-outbound-ports";
/// Outbound destinations that bypass the proxy (comma list of CIDRs or addresses).
pub const SKIP_OUTBOUND_CIDRS: &str = "config.sidemesh.io/skip-outbound-cidrs";
/// Ports proxied as plain TCP without protocol detection (comma list, ranges).
pub const OPAQUE_PORTS: &str = "config.sidemesh.io/opaque-ports";
/// `permissive` or `strict`.
pub const INBOUND_POLICY: &str = "config.sidemesh.io/inbound-policy";
/// The proxy container's CPU request (a Kubernetes quantity).
pub const PROXY_CPU_REQUEST: &str = "config.sidemesh.io/proxy-cpu-request";
/// The proxy container's CPU limit (a Kubernetes quantity).
pub const PROXY_CPU_LIMIT: &str = "config.sidemesh.io/proxy-cpu-limit";
/// The proxy container's memory request (a Kubernetes quantity).
pub const PROXY_MEMORY_REQUEST: &str = "config.sidemesh.io/proxy-memory-request";
/// The proxy container's memory limit (a Kubernetes quantity).
pub const PROXY_MEMORY_LIMIT: &str = "config.sidemesh.io/proxy-memory-limit";
/// The proxy's `SIDEMESH_LOG` filter.
pub const LOG_LEVEL: &str = "config.sidemesh.io/log-level";
/// `true`: run the proxy as a native sidecar (init container, `restartPolicy: Always`).
pub const NATIVE_SIDECAR: &str = "config.sidemesh.io/native-sidecar";

/// Every override annotation, in the order they are validated.
pub const OVERRIDES: &[&str] = &[
    SKIP_INBOUND_PORTS,
    SKIP_OUTBOUND_PORTS,
    SKIP_OUTBOUND_CIDRS,
    OPAQUE_PORTS,
    INBOUND_POLICY,
    PROXY_CPU_REQUEST,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_REQUEST,
    PROXY_MEMORY_LIMIT,
    LOG_LEVEL,
    NATIVE_SIDECAR,
];

/// Default CPU request of the proxy: a sidecar should be cheap, but a zero
/// request starves it on a busy node.
pub const DEFAULT_CPU_REQUEST: &str = "100m";
/// Default memory request of the proxy.
pub const DEFAULT_MEMORY_REQUEST: &str = "64Mi";
/// Default memory limit of the proxy (no CPU limit by default: CFS throttling
/// adds tail latency to every request through the proxy).
pub const DEFAULT_MEMORY_LIMIT: &str = "256Mi";

/// The longest annotation value quoted back in a message.
const QUOTE_MAX: usize = 80;
/// How many opaque ports a list of ranges may expand to (the proxy takes single ports).
const MAX_OPAQUE_PORTS: usize = 1024;
/// How many items one list may hold (bounds the work an admission can cause).
const MAX_LIST_ITEMS: usize = 256;

/// Where an annotation was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// On the Pod (or the Pod template).
    Pod,
    /// On the Pod's Namespace.
    Namespace(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod => f.write_str("on the Pod"),
            Self::Namespace(ns) => write!(f, "on Namespace {ns}"),
        }
    }
}

/// An annotation whose value is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation} {origin} has an invalid value {quoted}: {reason}", quoted = quote(.value))]
pub struct InvalidAnnotation {
    /// The annotation's name.
    pub annotation: &'static str,
    /// Where it was found.
    pub origin: Origin,
    /// The value as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Quotes a value for a message, shortened when long (annotations may hold
/// up to 256 KiB; a message should stay readable).
fn quote(value: &str) -> String {
    if value.chars().count() <= QUOTE_MAX {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(QUOTE_MAX).collect();
        format!("{head:?}… ({} bytes)", value.len())
    }
}

/// The value of `sidemesh.io/inject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectMode {
    /// `enabled`.
    Enabled,
    /// `disabled`.
    Disabled,
}

/// Parses `sidemesh.io/inject` as found at `origin`.
pub fn parse_inject(value: &str, origin: Origin) -> Result<InjectMode, InvalidAnnotation> {
    match value.trim() {
        "enabled" => Ok(InjectMode::Enabled),
        "disabled" => Ok(InjectMode::Disabled),
        _ => Err(InvalidAnnotation {
            annotation: INJECT,
            origin,
            value: value.to_owned(),
            reason: "must be enabled or disabled".into(),
        }),
    }
}

/// A destination port or an inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (equal to `first` for a single port).
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// The proxy's resource settings, as validated quantities.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    /// CPU request.
    pub cpu_request: Option<Quantity>,
    /// CPU limit.
    pub cpu_limit: Option<Quantity>,
    /// Memory request.
    pub memory_request: Option<Quantity>,
    /// Memory limit.
    pub memory_limit: Option<Quantity>,
}

/// A Kubernetes resource quantity (`100m`, `1.5`, `64Mi`, `1e3`), kept as
/// written and as a number for comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    /// The text, as it goes into the Pod.
    pub text: String,
    /// Its value in base units (cores, bytes).
    pub value: f64,
}

/// The effective settings for one Pod's proxy, all validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Overrides {
    /// Inbound ports not captured.
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound ports not captured.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destinations not captured, normalised (`10.0.0.0/8`).
    pub skip_outbound_cidrs: Vec<String>,
    /// Ports proxied as opaque TCP, expanded from ranges.
    pub opaque_ports: Vec<u16>,
    /// `permissive` or `strict`.
    pub inbound_policy: &'static str,
    /// The proxy's resources, defaults applied.
    pub resources: Resources,
    /// The proxy's log filter.
    pub log_level: String,
    /// Run the proxy as a native sidecar.
    pub native_sidecar: bool,
}

/// Annotations of the Pod and of its Namespace, looked up with the Pod's
/// value first.
#[derive(Debug, Clone, Copy)]
pub struct Layered<'a> {
    /// The Pod's (or template's) annotations.
    pub pod: Option<&'a BTreeMap<String, String>>,
    /// The Namespace's name and annotations, when known.
    pub namespace: Option<(&'a str, &'a BTreeMap<String, String>)>,
}

impl<'a> Layered<'a> {
    /// The effective value of `key` and where it came from.
    pub fn get(&self, key: &str) -> Option<(&'a str, Origin)> {
        if let Some(v) = self.pod.and_then(|p| p.get(key)) {
            return Some((v.as_str(), Origin::Pod));
        }
        let (name, annotations) = self.namespace?;
        annotations
            .get(key)
            .map(|v| (v.as_str(), Origin::Namespace(name.to_owned())))
    }
}

impl Overrides {
    /// The settings with no annotation at all.
    pub fn defaults() -> Self {
        Self {
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
            opaque_ports: Vec::new(),
            inbound_policy: "permissive",
            resources: Resources {
                cpu_request: Some(default_quantity(DEFAULT_CPU_REQUEST)),
                cpu_limit: None,
                memory_request: Some(default_quantity(DEFAULT_MEMORY_REQUEST)),
                memory_limit: Some(default_quantity(DEFAULT_MEMORY_LIMIT)),
            },
            log_level: "info".to_owned(),
            native_sidecar: false,
        }
    }

    /// Validates every override annotation (Pod first, then Namespace) and
    /// returns the effective settings, or the first invalid annotation.
    pub fn from_annotations(annotations: Layered<'_>) -> Result<Self, InvalidAnnotation> {
        let mut out = Self::defaults();
        let invalid = |annotation: &'static str, value: &str, origin: Origin, reason: String| InvalidAnnotation {
            annotation,
            origin,
            value: value.to_owned(),
            reason,
        };
        if let Some((v, o)) = annotations.get(SKIP_INBOUND_PORTS) {
            out.skip_inbound_ports = parse_port_list(v).map_err(|r| invalid(SKIP_INBOUND_PORTS, v, o, r))?;
        }
        if let Some((v, o)) = annotations.get(SKIP_OUTBOUND_PORTS) {
            out.skip_outbound_ports = parse_port_list(v).map_err(|r| invalid(SKIP_OUTBOUND_PORTS, v, o, r))?;
        }
        if let Some((v, o)) = annotations.get(SKIP_OUTBOUND_CIDRS) {
            out.skip_outbound_cidrs = parse_cidr_list(v).map_err(|r| invalid(SKIP_OUTBOUND_CIDRS, v, o, r))?;
        }
        if let Some((v, o)) = annotations.get(OPAQUE_PORTS) {
            out.opaque_ports = parse_opaque_ports(v).map_err(|r| invalid(OPAQUE_PORTS, v, o, r))?;
        }
        if let Some((v, o)) = annotations.get(INBOUND_POLICY) {
            out.inbound_policy = match v.trim() {
                "permissive" => "permissive",
                "strict" => "strict",
                _ => return Err(invalid(INBOUND_POLICY, v, o, "must be permissive or strict".into())),
            };
        }
        let quantity = |key: &'static str| -> Result<Option<(Quantity, Origin)>, InvalidAnnotation> {
            match annotations.get(key) {
                None => Ok(None),
                Some((v, o)) => match parse_quantity(v) {
                    Ok(q) => Ok(Some((q, o))),
                    Err(r) => Err(invalid(key, v, o, r)),
                },
            }
        };
        let cpu_request = quantity(PROXY_CPU_REQUEST)?;
        let cpu_limit = quantity(PROXY_CPU_LIMIT)?;
        let memory_request = quantity(PROXY_MEMORY_REQUEST)?;
        let memory_limit = quantity(PROXY_MEMORY_LIMIT)?;
        out.resources.cpu_request = reconcile(
            PROXY_CPU_REQUEST,
            PROXY_CPU_LIMIT,
            out.resources.cpu_request,
            cpu_request,
            &cpu_limit,
        )?;
        out.resources.cpu_limit = cpu_limit.map(|(q, _)| q);
        match memory_limit {
            Some(limit) => {
                out.resources.memory_request = reconcile(
                    PROXY_MEMORY_REQUEST,
                    PROXY_MEMORY_LIMIT,
                    out.resources.memory_request,
                    memory_request,
                    &Some(limit.clone()),
                )?;
                out.resources.memory_limit = Some(limit.0);
            }
            None => {
                if let Some((request, _)) = memory_request {
                    // A request above the default limit raises the limit with
                    // it rather than refusing a Pod that asked for nothing odd.
                    if out
                        .resources
                        .memory_limit
                        .as_ref()
                        .is_some_and(|l| request.value > l.value)
                    {
                        out.resources.memory_limit = Some(request.clone());
                    }
                    out.resources.memory_request = Some(request);
                }
            }
        }
        if let Some((v, o)) = annotations.get(LOG_LEVEL) {
            out.log_level = parse_log_level(v).map_err(|r| invalid(LOG_LEVEL, v, o, r))?;
        }
        if let Some((v, o)) = annotations.get(NATIVE_SIDECAR) {
            out.native_sidecar = match v.trim() {
                "true" => true,
                "false" => false,
                _ => return Err(invalid(NATIVE_SIDECAR, v, o, "must be true or false".into())),
            };
        }
        Ok(out)
    }
}

fn default_quantity(text: &str) -> Quantity {
    Quantity {
        text: text.to_owned(),
        value: parse_quantity(text).map(|q| q.value).unwrap_or_default(),
    }
}

/// Chooses a request given the default, an explicit request and a limit: an
/// explicit request above an explicit limit is refused (the API server would
/// refuse the Pod with a less helpful message); a default request above an
/// explicit limit is lowered to the limit, as Kubernetes itself defaults a
/// missing request to the limit.
fn reconcile(
    request_key: &'static str,
    limit_key: &'static str,
    default: Option<Quantity>,
    request: Option<(Quantity, Origin)>,
    limit: &Option<(Quantity, Origin)>,
) -> Result<Option<Quantity>, InvalidAnnotation> {
    match (request, limit) {
        (Some((req, origin)), Some((lim, _))) if req.value > lim.value => Err(InvalidAnnotation {
            annotation: request_key,
            origin,
            value: req.text.clone(),
            reason: format!("the request is above the limit {} ({limit_key})", lim.text),
        }),
        (Some((req, _)), _) => Ok(Some(req)),
        (None, Some((lim, _))) => Ok(match default {
            Some(d) if d.value > lim.value => Some(lim.clone()),
            other => other,
        }),
        (None, None) => Ok(default),
    }
}

/// Splits a comma list into trimmed items: an empty (or blank) value is an
/// empty list; an empty item inside a list is an error.
fn split_list(value: &str) -> Result<Vec<&str>, String> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    if items.len() > MAX_LIST_ITEMS {
        return Err(format!("more than {MAX_LIST_ITEMS} items"));
    }
    if items.iter().any(|i| i.is_empty()) {
        return Err("empty item in the list".into());
    }
    Ok(items)
}

fn parse_port(s: &str) -> Result<u16, String> {
    // Digits only: `+80`, ` 80` or `0x50` are not how anyone writes a port.
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a port (1-65535)"));
    }
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(format!("{s:?} is not a port (1-65535)")),
    }
}

/// Parses `80,443,8000-8100`.
pub fn parse_port_list(value: &str) -> Result<Vec<PortRange>, String> {
    let mut out = Vec::new();
    for item in split_list(value)? {
        let range = match item.split_once('-') {
            None => {
                let p = parse_port(item)?;
                PortRange { first: p, last: p }
            }
            Some((a, b)) => {
                let first = parse_port(a.trim())?;
                let last = parse_port(b.trim())?;
                if first > last {
                    return Err(format!("{item:?} is not a port range (first-last, first ≤ last)"));
                }
                PortRange { first, last }
            }
        };
        if !out.contains(&range) {
            out.push(range);
        }
    }
    Ok(out)
}

/// Parses opaque ports; ranges are expanded because the proxy takes single ports.
pub fn parse_opaque_ports(value: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for range in parse_port_list(value)? {
        if ports.len() + usize::from(range.last - range.first) + 1 > MAX_OPAQUE_PORTS {
            return Err(format!("more than {MAX_OPAQUE_PORTS} ports"));
        }
        ports.extend(range.first..=range.last);
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// Parses `10.0.0.0/8,192.168.1.1,fd00::/8`, normalised with host bits cleared.
pub fn parse_cidr_list(value: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in split_list(value)? {
        let cidr = parse_cidr(item)?;
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    Ok(out)
}

fn parse_cidr(item: &str) -> Result<String, String> {
    let bad = || format!("{item:?} is not a CIDR block (10.0.0.0/8, fd00::/8) or an IP address");
    let (addr, prefix) = match item.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (item, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse().map_err(|_| bad())?
        }
        Some(_) => return Err(bad()),
    };
    if prefix > max {
        return Err(format!("{item:?}: the prefix length is above {max}"));
    }
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(u32::from(32 - prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(u32::from(128 - prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    Ok(format!("{network}/{prefix}"))
}

/// Parses a Kubernetes quantity (`<number><suffix>`, suffix one of
/// `Ki Mi Gi Ti Pi Ei`, `m k M G T P E`, or `e<exponent>`); negative
/// quantities make no sense for resources and are refused.
pub fn parse_quantity(value: &str) -> Result<Quantity, String> {
    let bad = || format!("{value:?} is not a Kubernetes quantity (such as 100m, 0.5, 64Mi, 1Gi)");
    let s = value.trim();
    if s.is_empty() || s.len() > 32 {
        return Err(bad());
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.starts_with('-') {
        return Err(format!("{value:?} is negative"));
    }
    let number_len = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_len);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(bad());
    }
    let mantissa: f64 = number.parse().map_err(|_| bad())?;
    let multiplier = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let digits = &exp[1..];
            let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned.is_empty() || unsigned.len() > 2 || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let e: i32 = digits.parse().map_err(|_| bad())?;
            10f64.powi(e)
        }
        _ => return Err(bad()),
    };
    let value_f = mantissa * multiplier;
    // Kubernetes caps quantities at 2^63-1 in their base unit.
    if !value_f.is_finite() || value_f > 9.2e18 {
        return Err(format!("{value:?} is too large"));
    }
    Ok(Quantity {
        text: s.to_owned(),
        value: value_f,
    })
}

/// Validates a `SIDEMESH_LOG` filter: comma-separated directives, each a
/// level or `target=level` (targets are Rust module paths).
pub fn parse_log_level(value: &str) -> Result<String, String> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    let items = split_list(value)?;
    if items.is_empty() {
        return Err("the filter is empty".into());
    }
    for item in &items {
        let level = match item.split_once('=') {
            None => *item,
            Some((target, level)) => {
                let target_ok = !target.is_empty()
                    && target
                        .split("::")
                        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
                if !target_ok {
                    return Err(format!(
                        "{target:?} is not a module path such as sidemesh_proxy::inbound"
                    ));
                }
                level
            }
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{level:?} is not a level (trace, debug, info, warn, error, off)"
            ));
        }
    }
    Ok(items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn ports_and_ranges() {
        assert_eq!(parse_port_list(""), Ok(vec![]));
        assert_eq!(
            parse_port_list(" 80, 8000-8100 ,80"),
            Ok(vec![
                PortRange { first: 80, last: 80 },
                PortRange {
                    first: 8000,
                    last: 8100
                }
            ])
        );
        for bad in ["0", "65536", "x", "80,,90", "90-80", "+80", "1-", "-1", "80 81"] {
            assert!(parse_port_list(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_opaque_ports("3306,5000-5002"), Ok(vec![3306, 5000, 5001, 5002]));
        assert!(parse_opaque_ports("1-65535").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr_list("10.1.2.3/8, 192.168.1.1,fd00::1/8"),
            Ok(vec!["10.0.0.0/8".into(), "192.168.1.1/32".into(), "fd00::/8".into()])
        );
        assert_eq!(parse_cidr_list("0.0.0.0/0"), Ok(vec!["0.0.0.0/0".into()]));
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "10.0.0.0/", "::/129", "10.0.0.0/-1"] {
            assert!(parse_cidr_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn quantities() {
        let v = |s: &str| parse_quantity(s).map(|q| q.value);
        assert_eq!(v("100m"), Ok(0.1));
        assert_eq!(v("2"), Ok(2.0));
        assert_eq!(v("64Mi"), Ok(64.0 * 1024.0 * 1024.0));
        assert_eq!(v("1e3"), Ok(1000.0));
        assert_eq!(v(".5"), Ok(0.5));
        for bad in ["", "-1", "1.2.3", "10MB", "m", "1e", "1e999", "Mi", "1 Mi"] {
            assert!(parse_quantity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn log_levels() {
        assert_eq!(parse_log_level("debug"), Ok("debug".into()));
        assert_eq!(
            parse_log_level("info, sidemesh_proxy::inbound=trace"),
            Ok("info,sidemesh_proxy::inbound=trace".into())
        );
        for bad in ["", "loud", "x=y", "=info", "a b=info"] {
            assert!(parse_log_level(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pod_wins_over_namespace() {
        let p = pod(&[(INBOUND_POLICY, "strict")]);
        let n = pod(&[(INBOUND_POLICY, "permissive"), (LOG_LEVEL, "debug")]);
        let o = Overrides::from_annotations(Layered {
            pod: Some(&p),
            namespace: Some(("apps", &n)),
        })
        .unwrap();
        assert_eq!(o.inbound_policy, "strict");
        assert_eq!(o.log_level, "debug");
    }

    #[test]
    fn invalid_names_annotation_origin_and_value() {
        let n = pod(&[(NATIVE_SIDECAR, "yes")]);
        let e = Overrides::from_annotations(Layered {
            pod: None,
            namespace: Some(("apps", &n)),
        })
        .unwrap_err();
        assert_eq!(e.annotation, NATIVE_SIDECAR);
        assert_eq!(
            e.to_string(),
            "annotation config.sidemesh.io/native-sidecar on Namespace apps has an invalid value \"yes\": must be true or false"
        );
    }

    #[test]
    fn resources_reconciled() {
        let p = pod(&[(PROXY_MEMORY_LIMIT, "32Mi")]);
        let o = Overrides::from_annotations(Layered {
            pod: Some(&p),
            namespace: None,
        })
        .unwrap();
        assert_eq!(o.resources.memory_request.map(|q| q.text), Some("32Mi".into()));
        let p = pod(&[(PROXY_MEMORY_REQUEST, "1Gi")]);
        let o = Overrides::from_annotations(Layered {
            pod: Some(&p),
            namespace: None,
        })
        .unwrap();
        assert_eq!(o.resources.memory_limit.map(|q| q.text), Some("1Gi".into()));
        let p = pod(&[(PROXY_CPU_REQUEST, "2"), (PROXY_CPU_LIMIT, "1")]);
        let e = Overrides::from_annotations(Layered {
            pod: Some(&p),
            namespace: None,
        })
        .unwrap_err();
        assert_eq!(e.annotation, PROXY_CPU_REQUEST);
        assert!(e.reason.contains("above the limit 1"), "{e}");
    }
}
