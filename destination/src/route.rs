//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`): the fields
//! sidemesh reads, as small serde structs, and their reduction to a
//! [`RouteRecord`] with every rule validated.
//!
//! Why not the `gateway-api` crate: its current release (0.22) is built on
//! kube 4 and k8s-openapi 0.28 (and schemars), so it would link a second kube
//! and k8s-openapi next to the workspace's kube 5 / 0.29. The structs here
//! cover the fields used and ignore the rest.
//!
//! Numbers that the CRD schema bounds (weights, ports, attempts) are read as
//! `i64` so that an out-of-range value in a file reaches validation and is
//! reported against its rule, instead of failing the whole object.

use std::borrow::Cow;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::{Value, json};
use sidemesh_proto::destination::v1 as pb;

use crate::objects::Key;

/// API group of HTTPRoute.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The `controllerName` sidemesh writes in `status.parents[]`.
pub const CONTROLLER_NAME: &str = "sidemesh.io/destination";
/// Regexes compile to at most this much memory (the regex crate's default is
/// 10 MiB); larger ones are refused, they are not what a route needs.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Retries a route may ask for at most.
const MAX_RETRIES: i64 = 1000;

/// An HTTPRoute, as far as sidemesh reads it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Standard metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: HttpRouteSpec,
    /// Status (its `parents` are kept whole, so entries of other controllers survive our patches).
    #[serde(default)]
    pub status: Option<HttpRouteStatus>,
}

impl kube::Resource for HttpRoute {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "HTTPRoute".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "httproutes".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// `spec` of an HTTPRoute.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// What the route attaches to (sidemesh reads the `Service` ones).
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Rules; absent means one rule matching every request (the CRD default).
    #[serde(default)]
    pub rules: Option<Vec<HttpRouteRule>>,
}

/// `spec.parentRefs[]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// API group; unset means `gateway.networking.k8s.io` in the schema, but
    /// with `kind: Service` sidemesh reads unset as the core group.
    pub group: Option<String>,
    /// Kind; unset means `Gateway`.
    pub kind: Option<String>,
    /// Namespace; unset means the route's.
    pub namespace: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Service port the route is limited to.
    pub port: Option<i64>,
    /// Service port name the route is limited to.
    pub section_name: Option<String>,
}

/// `spec.rules[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Optional rule name.
    pub name: Option<String>,
    /// Any of these matches; none means PathPrefix `/`.
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Where matching requests go.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Filters (not applied by sidemesh; logged).
    #[serde(default)]
    pub filters: Vec<Value>,
    /// Timeouts.
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retries (GEP-1731).
    pub retry: Option<HttpRouteRetry>,
}

/// `matches[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Path match; unset means PathPrefix `/`.
    pub path: Option<HttpPathMatch>,
    /// Header matches (all must hold).
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameter matches (all must hold).
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    /// Method.
    pub method: Option<String>,
}

/// `matches[].path`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Value (default `/`).
    pub value: Option<String>,
}

/// `matches[].headers[]` and `matches[].queryParams[]`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ValueMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Header or parameter name.
    #[serde(default)]
    pub name: String,
    /// Value.
    #[serde(default)]
    pub value: String,
}

/// `backendRefs[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// API group; unset means core.
    pub group: Option<String>,
    /// Kind; unset means `Service`.
    pub kind: Option<String>,
    /// Namespace; unset means the route's.
    pub namespace: Option<String>,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Service port (required for a Service).
    pub port: Option<i64>,
    /// Relative weight, default 1.
    pub weight: Option<i64>,
    /// Filters (not applied).
    #[serde(default)]
    pub filters: Vec<Value>,
}

/// `timeouts`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// Whole request, retries included.
    pub request: Option<String>,
    /// Each attempt.
    pub backend_request: Option<String>,
}

/// `retry` (experimental channel, GEP-1731).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpRouteRetry {
    /// Status codes to retry.
    #[serde(default)]
    pub codes: Vec<i64>,
    /// Retries after the first attempt.
    pub attempts: Option<i64>,
    /// Base backoff.
    pub backoff: Option<String>,
}

/// `status`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HttpRouteStatus {
    /// Per-parent status entries, of every controller.
    #[serde(default)]
    pub parents: Vec<Value>,
}

/// A `Service` parent of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceParent {
    /// The Service.
    pub service: Key,
    /// Only this Service port.
    pub port: Option<u16>,
    /// Only the Service port of this name.
    pub section_name: Option<String>,
    /// The reference as written, echoed in `status.parents[].parentRef`.
    pub echo: Value,
}

impl ServiceParent {
    /// Whether the route attaches to Service port `port` named `name`.
    pub fn attaches(&self, port: u16, name: &str) -> bool {
        self.port.is_none_or(|p| p == port) && self.section_name.as_deref().is_none_or(|s| s == name)
    }
}

/// Where a backendRef points.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendTarget {
    /// A Service port.
    Service {
        /// The Service.
        service: Key,
        /// Its port (the Service port, not the target port).
        port: u16,
    },
    /// Something that is not a Service: its share of requests gets 500.
    Other {
        /// Kind.
        kind: String,
        /// API group.
        group: String,
        /// Namespace and name.
        object: Key,
    },
}

impl BackendTarget {
    /// The key of its `Backend` in a `Service` answer.
    pub fn key(&self) -> String {
        match self {
            BackendTarget::Service { service, port } => format!("{service}:{port}"),
            BackendTarget::Other { kind, group, object } if group.is_empty() => format!("{kind}:{object}"),
            BackendTarget::Other { kind, group, object } => format!("{kind}.{group}:{object}"),
        }
    }
}

/// One weighted backendRef of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRef {
    /// Where it points.
    pub target: BackendTarget,
    /// Relative weight.
    pub weight: u32,
}

/// A valid rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRecord {
    /// Index within the route's rules.
    pub index: u32,
    /// The rule's `name`, or empty.
    pub name: String,
    /// Matches, never empty.
    pub matches: Vec<pb::RouteMatch>,
    /// Backends; empty means the parent Service itself.
    pub backends: Vec<BackendRef>,
    /// `timeouts.request` (unset or `0s`: none).
    pub request_timeout: Option<prost_types::Duration>,
    /// `timeouts.backendRequest` (unset or `0s`: none).
    pub backend_request_timeout: Option<prost_types::Duration>,
    /// Retry policy (none when the route asks for no retries).
    pub retry: Option<pb::Retry>,
    /// Filters are present but not applied.
    pub ignored_filters: bool,
}

/// A rule dropped as invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleProblem {
    /// Index within the route's rules.
    pub rule: u32,
    /// Short reason, the metric label (`bad_regex`, `bad_weight`…).
    pub reason: &'static str,
    /// What is wrong, for logs and status messages.
    pub message: String,
}

/// What is kept of an HTTPRoute.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRecord {
    /// Namespace and name.
    pub key: Key,
    /// `creationTimestamp` in seconds (unset in files: sorts first).
    pub created: Option<i64>,
    /// `metadata.generation` (0 when unset).
    pub generation: i64,
    /// `metadata.resourceVersion` (empty in files).
    pub resource_version: String,
    /// Service parents; other parents (Gateways) are someone else's.
    pub parents: Vec<ServiceParent>,
    /// Valid rules, in order.
    pub rules: Vec<RuleRecord>,
    /// Rules dropped as invalid.
    pub dropped: Vec<RuleProblem>,
    /// `status.parents` as last read.
    pub status_parents: Vec<Value>,
}

/// Parses a Gateway API duration (GEP-2257): one to four `<1-5 digits><h|m|s|ms>`
/// components, such as `10s`, `500ms`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{:?} is not a Gateway API duration (such as 10s, 500ms, 1h30m)",
            short(s)
        )
    };
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).map_err(|_| bad())?;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

fn to_proto(d: Duration) -> Option<prost_types::Duration> {
    // Zero disables a timeout (Gateway API), which the proto says by leaving it unset.
    (!d.is_zero()).then(|| prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    })
}

/// Compiles a pattern as the proxy will (anchored to the whole value), to
/// refuse what the proxy could not use.
fn check_regex(pattern: &str, max_len: usize) -> Result<(), String> {
    if pattern.len() > max_len {
        return Err(format!("regular expression longer than {max_len} bytes"));
    }
    regex_lite::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map(drop)
        .map_err(|e| {
            let first = e.to_string().lines().last().unwrap_or_default().trim().to_owned();
            format!("regular expression {:?} does not compile: {first}", short(pattern))
        })
}

/// Path values allowed for Exact and PathPrefix (the CRD's CEL rules).
fn check_path(value: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("path {:?} {why}", short(value)));
    if !value.starts_with('/') {
        return bad("must start with '/'");
    }
    if value.len() > 1024 {
        return bad("is longer than 1024 bytes");
    }
    for seq in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(seq) {
            return bad(&format!("must not contain {seq:?}"));
        }
    }
    if value.ends_with("/..") || value.ends_with("/.") {
        return bad("must not end with '/.' or '/..'");
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return bad("has a '%' not followed by two hex digits");
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&b)) {
            return bad("has a character not allowed in a path");
        }
        i += 1;
    }
    Ok(())
}

/// An HTTP token (header and query parameter names).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn is_regex_type(kind: Option<&str>, what: &str) -> Result<bool, String> {
    match kind.unwrap_or("Exact") {
        "Exact" => Ok(false),
        "RegularExpression" => Ok(true),
        other => Err(format!(
            "{what} match type {:?} is not Exact or RegularExpression",
            short(other)
        )),
    }
}

type Problem = (&'static str, String);

fn route_match(m: &HttpRouteMatch) -> Result<pb::RouteMatch, Problem> {
    let path = m.path.clone().unwrap_or_default();
    let value = path.value.unwrap_or_else(|| "/".to_owned());
    let kind = match path.kind.as_deref().unwrap_or("PathPrefix") {
        "PathPrefix" => {
            check_path(&value).map_err(|e| ("bad_path", e))?;
            pb::path_match::Kind::Prefix
        }
        "Exact" => {
            check_path(&value).map_err(|e| ("bad_path", e))?;
            pb::path_match::Kind::Exact
        }
        "RegularExpression" => {
            check_regex(&value, 1024).map_err(|e| ("bad_regex", format!("path: {e}")))?;
            pb::path_match::Kind::Regex
        }
        other => {
            return Err((
                "bad_path",
                format!(
                    "path match type {:?} is not Exact, PathPrefix or RegularExpression",
                    short(other)
                ),
            ));
        }
    };
    let mut headers: Vec<pb::HeaderMatch> = Vec::new();
    for h in &m.headers {
        if !is_token(&h.name) {
            return Err((
                "bad_header",
                format!("header name {:?} is not a valid name", short(&h.name)),
            ));
        }
        let regex = is_regex_type(h.kind.as_deref(), "header").map_err(|e| ("bad_header", e))?;
        if regex {
            check_regex(&h.value, 4096).map_err(|e| ("bad_regex", format!("header {}: {e}", h.name)))?;
        } else if h.value.len() > 4096 {
            return Err(("bad_header", format!("header {} value longer than 4096 bytes", h.name)));
        }
        let name = h.name.to_ascii_lowercase();
        // Header names are case-insensitive; of equivalent entries only the first counts.
        if headers.iter().all(|x| x.name != name) {
            headers.push(pb::HeaderMatch {
                regex,
                name,
                value: h.value.clone(),
            });
        }
    }
    let mut query_params: Vec<pb::QueryMatch> = Vec::new();
    for q in &m.query_params {
        if !is_token(&q.name) {
            return Err((
                "bad_query_param",
                format!("query parameter name {:?} is not a valid name", short(&q.name)),
            ));
        }
        let regex = is_regex_type(q.kind.as_deref(), "query parameter").map_err(|e| ("bad_query_param", e))?;
        if regex {
            check_regex(&q.value, 1024).map_err(|e| ("bad_regex", format!("query parameter {}: {e}", q.name)))?;
        } else if q.value.len() > 1024 {
            return Err((
                "bad_query_param",
                format!("query parameter {} value longer than 1024 bytes", q.name),
            ));
        }
        if query_params.iter().all(|x| x.name != q.name) {
            query_params.push(pb::QueryMatch {
                regex,
                name: q.name.clone(),
                value: q.value.clone(),
            });
        }
    }
    let method = match m.method.as_deref() {
        None => String::new(),
        Some(m) if METHODS.contains(&m) => m.to_owned(),
        Some(other) => return Err(("bad_method", format!("method {:?} is not an HTTP method", short(other)))),
    };
    Ok(pb::RouteMatch {
        path: Some(pb::PathMatch {
            kind: kind as i32,
            value,
        }),
        headers,
        query_params,
        method,
    })
}

fn is_core(group: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core"))
}

fn backend_ref(b: &HttpBackendRef, route_ns: &str) -> Result<BackendRef, Problem> {
    let weight = match b.weight.unwrap_or(1) {
        w @ 0..=1_000_000 => w as u32,
        w => {
            return Err((
                "bad_weight",
                format!("backendRef {}: weight {w} is not within 0..=1000000", b.name),
            ));
        }
    };
    if b.name.is_empty() {
        return Err(("bad_backend", "backendRef without a name".to_owned()));
    }
    let namespace = b
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| route_ns.to_owned());
    let object = Key::new(namespace, b.name.clone());
    let kind = b.kind.clone().unwrap_or_else(|| "Service".to_owned());
    let target = if kind == "Service" && is_core(b.group.as_deref()) {
        let port = match b.port {
            Some(p @ 1..=65535) => p as u16,
            Some(p) => return Err(("bad_port", format!("backendRef {}: port {p} is not a port", b.name))),
            None => {
                return Err((
                    "bad_port",
                    format!("backendRef {}: a Service reference needs a port", b.name),
                ));
            }
        };
        BackendTarget::Service { service: object, port }
    } else {
        BackendTarget::Other {
            kind,
            group: b.group.clone().unwrap_or_default(),
            object,
        }
    };
    Ok(BackendRef { target, weight })
}

fn duration_field(value: Option<&str>, what: &str) -> Result<Option<Duration>, Problem> {
    value
        .map(|v| parse_duration(v).map_err(|e| ("bad_duration", format!("{what}: {e}"))))
        .transpose()
}

fn rule(r: &HttpRouteRule, index: u32, route_ns: &str) -> Result<RuleRecord, Problem> {
    let matches = if r.matches.is_empty() {
        vec![route_match(&HttpRouteMatch::default())?]
    } else {
        r.matches.iter().map(route_match).collect::<Result<Vec<_>, _>>()?
    };
    let backends = r
        .backend_refs
        .iter()
        .map(|b| backend_ref(b, route_ns))
        .collect::<Result<Vec<_>, _>>()?;
    let timeouts = r.timeouts.clone().unwrap_or_default();
    let request = duration_field(timeouts.request.as_deref(), "timeouts.request")?;
    let backend_request = duration_field(timeouts.backend_request.as_deref(), "timeouts.backendRequest")?;
    if let (Some(req), Some(each)) = (request, backend_request)
        && !req.is_zero()
        && each > req
    {
        return Err((
            "bad_timeouts",
            "timeouts.backendRequest is longer than timeouts.request".to_owned(),
        ));
    }
    let retry = match &r.retry {
        None => None,
        Some(retry) => {
            let attempts = retry.attempts.unwrap_or(1);
            if !(0..=MAX_RETRIES).contains(&attempts) {
                return Err((
                    "bad_retry",
                    format!("retry.attempts {attempts} is not within 0..={MAX_RETRIES}"),
                ));
            }
            let mut codes = Vec::with_capacity(retry.codes.len());
            for &c in &retry.codes {
                if !(400..=599).contains(&c) {
                    return Err(("bad_retry", format!("retry.codes: {c} is not within 400..=599")));
                }
                if !codes.contains(&(c as u32)) {
                    codes.push(c as u32);
                }
            }
            let backoff = duration_field(retry.backoff.as_deref(), "retry.backoff")?;
            // attempts counts retries; the proto counts attempts, the first included.
            (attempts > 0).then(|| pb::Retry {
                attempts: attempts as u32 + 1,
                codes,
                backoff: backoff.and_then(to_proto),
            })
        }
    };
    Ok(RuleRecord {
        index,
        name: r.name.clone().unwrap_or_default(),
        matches,
        backends,
        request_timeout: request.and_then(to_proto),
        backend_request_timeout: backend_request.and_then(to_proto),
        retry,
        ignored_filters: !r.filters.is_empty() || r.backend_refs.iter().any(|b| !b.filters.is_empty()),
    })
}

fn service_parent(p: &ParentReference, route_ns: &str) -> Option<ServiceParent> {
    if p.kind.as_deref() != Some("Service") || !is_core(p.group.as_deref()) || p.name.is_empty() {
        return None;
    }
    let namespace = p
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| route_ns.to_owned());
    let mut echo = json!({ "group": p.group.clone().unwrap_or_default(), "kind": "Service", "name": p.name });
    if let Some(ns) = &p.namespace {
        echo["namespace"] = json!(ns);
    }
    if let Some(port) = p.port {
        echo["port"] = json!(port);
    }
    if let Some(s) = &p.section_name {
        echo["sectionName"] = json!(s);
    }
    Some(ServiceParent {
        service: Key::new(namespace, p.name.clone()),
        // A port outside 1..=65535 matches no Service port.
        port: p.port.map(|p| u16::try_from(p).unwrap_or(0)),
        section_name: p.section_name.clone(),
        echo,
    })
}

/// Reduces a route to its record: Service parents, valid rules, and the
/// problems of the rules dropped.
pub fn record(route: &HttpRoute, key: Key) -> RouteRecord {
    let meta = &route.metadata;
    let mut parents: Vec<ServiceParent> = Vec::new();
    for p in route
        .spec
        .parent_refs
        .iter()
        .filter_map(|p| service_parent(p, &key.namespace))
    {
        if !parents.contains(&p) {
            parents.push(p);
        }
    }
    let default_rules = [HttpRouteRule::default()];
    let rules = route.spec.rules.as_deref().unwrap_or(&default_rules);
    let mut valid = Vec::new();
    let mut dropped = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        match rule(r, index, &key.namespace) {
            Ok(r) => valid.push(r),
            Err((reason, message)) => dropped.push(RuleProblem {
                rule: index,
                reason,
                message,
            }),
        }
    }
    RouteRecord {
        created: meta.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        generation: meta.generation.unwrap_or_default(),
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        parents,
        rules: valid,
        dropped,
        status_parents: route.status.as_ref().map(|s| s.parents.clone()).unwrap_or_default(),
        key,
    }
}

/// One condition of a `status.parents[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// `Accepted`, `ResolvedRefs`, `PartiallyInvalid`.
    pub kind: &'static str,
    /// True or False.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
}

/// The status sidemesh owns for one Service parent of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentStatus {
    /// The parentRef as written.
    pub parent_ref: Value,
    /// Its conditions.
    pub conditions: Vec<Condition>,
}

/// A route's problems and the status it should carry.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteStatus {
    /// `metadata.generation` the status is about.
    pub generation: i64,
    /// `metadata.resourceVersion` it was computed from (a patch precondition).
    pub resource_version: String,
    /// One entry per Service parent.
    pub parents: Vec<ParentStatus>,
    /// Every problem as (metric reason, message): dropped rules, unresolved refs, missing parents.
    pub problems: Vec<(&'static str, String)>,
    /// `status.parents` as last read.
    pub current: Vec<Value>,
}

fn condition_matches(have: &Value, want: &Condition, generation: i64) -> bool {
    have["type"] == want.kind
        && have["status"] == if want.status { "True" } else { "False" }
        && have["reason"] == want.reason
        && have["message"] == want.message.as_str()
        && have["observedGeneration"].as_i64() == Some(generation)
}

impl RouteStatus {
    fn ours(v: &Value) -> bool {
        v["controllerName"] == CONTROLLER_NAME
    }

    /// Whether `status.parents` already says what it should (times aside).
    pub fn is_current(&self) -> bool {
        let ours: Vec<&Value> = self.current.iter().filter(|v| Self::ours(v)).collect();
        ours.len() == self.parents.len()
            && self.parents.iter().all(|p| {
                ours.iter().any(|have| {
                    have["parentRef"] == p.parent_ref
                        && have["conditions"].as_array().is_some_and(|cs| {
                            cs.len() == p.conditions.len()
                                && p.conditions
                                    .iter()
                                    .all(|c| cs.iter().any(|h| condition_matches(h, c, self.generation)))
                        })
                })
            })
    }

    /// The merge patch that sets sidemesh's entries and keeps the other
    /// controllers' ones; `now` is the transition time of changed conditions
    /// (an unchanged condition keeps its time). The resourceVersion makes it
    /// conditional: if someone else wrote meanwhile, it fails with 409.
    pub fn patch(&self, now: &Value) -> Value {
        let mut parents: Vec<Value> = self.current.iter().filter(|v| !Self::ours(v)).cloned().collect();
        for p in &self.parents {
            let previous = self
                .current
                .iter()
                .find(|v| Self::ours(v) && v["parentRef"] == p.parent_ref)
                .and_then(|v| v["conditions"].as_array());
            let conditions: Vec<Value> = p
                .conditions
                .iter()
                .map(|c| {
                    let status = if c.status { "True" } else { "False" };
                    let since = previous
                        .and_then(|cs| cs.iter().find(|h| h["type"] == c.kind && h["status"] == status))
                        .map(|h| h["lastTransitionTime"].clone())
                        .filter(Value::is_string)
                        .unwrap_or_else(|| now.clone());
                    json!({
                        "type": c.kind,
                        "status": status,
                        "reason": c.reason,
                        "message": c.message,
                        "observedGeneration": self.generation,
                        "lastTransitionTime": since,
                    })
                })
                .collect();
            parents.push(json!({
                "parentRef": p.parent_ref,
                "controllerName": CONTROLLER_NAME,
                "conditions": conditions,
            }));
        }
        json!({
            "metadata": { "resourceVersion": self.resource_version },
            "status": { "parents": parents },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> RouteRecord {
        let route: HttpRoute = serde_saphyr::from_str(yaml).unwrap();
        record(&route, Key::new("shop", "r"))
    }

    #[test]
    fn regexes_are_checked_as_the_proxy_compiles_them() {
        for good in ["/api/v[0-9]+/.*", "(?i)/shop", r"\d{3}-\w+", "a|b|"] {
            assert!(check_regex(good, 1024).is_ok(), "{good:?}");
        }
        // regex-lite: no Unicode classes, no look-around, no backreferences.
        for bad in [r"\p{L}+", "(?=x)", r"(a)\1", "(", "a{1000000}"] {
            let err = check_regex(bad, 1024).unwrap_err();
            assert!(err.contains("does not compile"), "{bad:?}: {err}");
        }
        assert!(
            check_regex(&"a".repeat(2000), 1024)
                .unwrap_err()
                .contains("longer than")
        );
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1h30m", 5_400_000),
            ("0s", 0),
            ("1m1s1ms", 61_001),
        ] {
            assert_eq!(parse_duration(s).unwrap(), Duration::from_millis(ms), "{s}");
        }
        for bad in ["", "10", "1.5s", "-1s", "123456s", "1d", "1s1s1s1s1s", "s", " 1s", "1S"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rules_are_validated_one_by_one() {
        let r = parse(
            r#"
metadata: { name: r, namespace: shop }
spec:
  parentRefs:
  - { kind: Service, name: web, port: 80 }
  - { kind: Service, group: core, name: web, namespace: other }
  - { name: gw }
  - { kind: Service, group: gateway.networking.k8s.io, name: x }
  rules:
  - matches:
    - path: { type: Exact, value: /a }
      headers: [{ name: X-Env, value: canary }, { name: x-env, value: ignored }]
      queryParams: [{ type: RegularExpression, name: v, value: "[0-9]+" }]
      method: GET
    - {}
    backendRefs:
    - { name: web, port: 80, weight: 90 }
    - { name: web-canary, port: 80, weight: 10, namespace: canary }
    - { kind: ServiceImport, group: multicluster.x-k8s.io, name: far }
    timeouts: { request: 10s, backendRequest: 2s }
    retry: { attempts: 3, codes: [503, 503, 502], backoff: 100ms }
  - matches: [{ path: { type: RegularExpression, value: "/(a" } }]
  - backendRefs: [{ name: web, port: 80, weight: -1 }]
  - timeouts: { request: 10 seconds }
  - timeouts: { request: 1s, backendRequest: 2s }
  - backendRefs: [{ name: web }]
  - retry: { attempts: 0 }
  - matches: [{ path: { value: /a//b } }]
"#,
        );
        assert_eq!(r.parents.len(), 2, "{:?}", r.parents);
        assert_eq!(r.parents[0].service, Key::new("shop", "web"));
        assert_eq!(r.parents[0].port, Some(80));
        assert_eq!(r.parents[1].service, Key::new("other", "web"));
        let valid: Vec<u32> = r.rules.iter().map(|r| r.index).collect();
        assert_eq!(valid, vec![0, 6]);
        let reasons: Vec<(u32, &str)> = r.dropped.iter().map(|p| (p.rule, p.reason)).collect();
        assert_eq!(
            reasons,
            vec![
                (1, "bad_regex"),
                (2, "bad_weight"),
                (3, "bad_duration"),
                (4, "bad_timeouts"),
                (5, "bad_port"),
                (7, "bad_path")
            ]
        );
        let r0 = &r.rules[0];
        assert_eq!(r0.matches.len(), 2);
        let m = &r0.matches[0];
        assert_eq!(m.headers.len(), 1, "first of equivalent header names wins");
        assert_eq!(
            (m.headers[0].name.as_str(), m.headers[0].value.as_str()),
            ("x-env", "canary")
        );
        assert!(m.query_params[0].regex);
        assert_eq!(m.method, "GET");
        let any = r0.matches[1].path.as_ref().unwrap();
        assert_eq!(
            (any.kind, any.value.as_str()),
            (pb::path_match::Kind::Prefix as i32, "/")
        );
        assert_eq!(r0.backends[0].weight, 90);
        assert_eq!(r0.backends[1].target.key(), "canary/web-canary:80");
        assert_eq!(
            r0.backends[2].target.key(),
            "ServiceImport.multicluster.x-k8s.io:shop/far"
        );
        assert_eq!(r0.request_timeout.unwrap().seconds, 10);
        let retry = r0.retry.as_ref().unwrap();
        assert_eq!((retry.attempts, retry.codes.clone()), (4, vec![503, 502]));
        assert_eq!(retry.backoff.unwrap().nanos, 100_000_000);
        assert!(r.rules[1].retry.is_none(), "attempts 0: no retries");
    }

    #[test]
    fn no_rules_means_one_rule_matching_everything() {
        let r = parse("spec: { parentRefs: [{ kind: Service, name: web }] }");
        assert_eq!(r.rules.len(), 1);
        assert!(r.rules[0].backends.is_empty());
        assert_eq!(r.rules[0].matches.len(), 1);
    }

    #[test]
    fn status_patch_keeps_other_controllers_and_unchanged_times() {
        let status = RouteStatus {
            generation: 2,
            resource_version: "7".into(),
            parents: vec![ParentStatus {
                parent_ref: json!({ "group": "", "kind": "Service", "name": "web" }),
                conditions: vec![Condition {
                    kind: "Accepted",
                    status: true,
                    reason: "Accepted",
                    message: "Accepted".into(),
                }],
            }],
            problems: Vec::new(),
            current: vec![
                json!({ "controllerName": "example.com/gw", "parentRef": { "name": "gw" }, "conditions": [] }),
                json!({ "controllerName": CONTROLLER_NAME, "parentRef": { "group": "", "kind": "Service", "name": "web" },
                        "conditions": [{ "type": "Accepted", "status": "True", "reason": "Accepted", "message": "Accepted",
                                         "observedGeneration": 1, "lastTransitionTime": "2020-01-01T00:00:00Z" }] }),
            ],
        };
        assert!(!status.is_current(), "observedGeneration is behind");
        let patch = status.patch(&json!("2030-01-01T00:00:00Z"));
        let parents = patch["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0]["controllerName"], "example.com/gw");
        assert_eq!(
            parents[1]["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(parents[1]["conditions"][0]["observedGeneration"], 2);
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        let now_current = RouteStatus {
            current: parents.clone(),
            ..status
        };
        assert!(now_current.is_current());
    }
}
