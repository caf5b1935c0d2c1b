//! A Service's traffic policy as the proxy applies it: the HTTPRoute rules
//! the destination service sent, compiled once per update (regexes built,
//! backends indexed, metric attributes of every route and backend built),
//! and matched per request by Gateway API precedence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use opentelemetry::KeyValue;
use regex_lite::Regex;
use sidemesh_proto::destination::v1::{self as pb, path_match};

use crate::endpoint::Endpoint;
use crate::retry::Budget;
use crate::telemetry::{self, RouteLabels};

/// One compiled path matcher.
#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    fn new(regex: bool, value: &str) -> Option<Self> {
        if regex {
            Regex::new(&format!("^(?:{value})$")).ok().map(Self::Regex)
        } else {
            Some(Self::Exact(value.to_owned()))
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => e == v,
            Self::Regex(r) => r.is_match(v),
        }
    }
}

/// One `matches` entry of a rule.
#[derive(Debug)]
struct Match {
    path: PathMatcher,
    method: Option<http::Method>,
    headers: Vec<(http::HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
}

/// How specific a match is, per Gateway API precedence (larger wins).
type Rank = (u8, usize, bool, usize, usize);

impl Match {
    fn compile(m: &pb::RouteMatch) -> Option<Self> {
        let path = match &m.path {
            None => PathMatcher::Prefix("/".into()),
            Some(p) => match path_match::Kind::try_from(p.kind).ok()? {
                path_match::Kind::Exact => PathMatcher::Exact(p.value.clone()),
                path_match::Kind::Prefix => PathMatcher::Prefix(p.value.trim_end_matches('/').to_owned()),
                path_match::Kind::Regex => PathMatcher::Regex(Regex::new(&format!("^(?:{})$", p.value)).ok()?),
            },
        };
        let method = if m.method.is_empty() {
            None
        } else {
            Some(http::Method::from_bytes(m.method.as_bytes()).ok()?)
        };
        let headers = m
            .headers
            .iter()
            .map(|h| {
                Some((
                    http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                    ValueMatcher::new(h.regex, &h.value)?,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        let query = m
            .query_params
            .iter()
            .map(|q| Some((q.name.clone(), ValueMatcher::new(q.regex, &q.value)?)))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            path,
            method,
            headers,
            query,
        })
    }

    fn rank(&self) -> Rank {
        // Gateway API leaves regex precedence to implementations: here it
        // ranks below Exact and above every PathPrefix, so a catch-all prefix
        // route cannot shadow regex routes.
        let (kind, len) = match &self.path {
            PathMatcher::Exact(p) => (3, p.len()),
            PathMatcher::Regex(_) => (2, 0),
            PathMatcher::Prefix(p) => (1, p.len()),
        };
        (kind, len, self.method.is_some(), self.headers.len(), self.query.len())
    }

    fn matches<B>(&self, req: &Request<B>) -> bool {
        let path = req.uri().path();
        let path_ok = match &self.path {
            PathMatcher::Exact(p) => path == p,
            // Prefix matching is by path element: /foo matches /foo and /foo/bar, not /foobar.
            PathMatcher::Prefix(p) => {
                p.is_empty()
                    || (path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            PathMatcher::Regex(r) => r.is_match(path),
        };
        if !path_ok {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| m != req.method()) {
            return false;
        }
        for (name, value) in &self.headers {
            let found = req
                .headers()
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| value.matches(v)));
            if !found {
                return false;
            }
        }
        if !self.query.is_empty() {
            let pairs: Vec<(&str, &str)> = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .collect();
            for (name, value) in &self.query {
                // The first occurrence of a parameter counts (Gateway API).
                match pairs.iter().find(|(k, _)| k == name) {
                    Some((_, v)) if value.matches(v) => {}
                    _ => return false,
                }
            }
        }
        true
    }
}

/// Retries a rule asks for.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts, the first included.
    pub attempts: u32,
    /// Status codes that are retried.
    pub codes: Vec<u16>,
    /// Base backoff between attempts.
    pub backoff: Duration,
}

/// One weighted backend of a rule.
#[derive(Debug)]
pub struct RuleBackend {
    /// Key into [`ServicePolicy::backends`] (`namespace/name:port`).
    pub key: String,
    /// Weight in the split.
    pub weight: u32,
    /// Metric attributes of requests sent to it by this rule.
    pub labels: Arc<RouteLabels>,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name` of the HTTPRoute.
    pub name: String,
    /// Rule index.
    pub index: u32,
    matches: Vec<Match>,
    /// Weighted backends.
    pub backends: Vec<RuleBackend>,
    /// Metric attributes of the rule's requests that reach no backend.
    pub labels: Arc<RouteLabels>,
    /// Whole-request timeout, retries included.
    pub request_timeout: Option<Duration>,
    /// Per-attempt timeout.
    pub backend_timeout: Option<Duration>,
    /// Retry policy.
    pub retry: Option<RetryPolicy>,
}

fn duration(d: &Option<prost_types::Duration>) -> Option<Duration> {
    let d = d.as_ref()?;
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    let d = Duration::new(secs, nanos);
    (!d.is_zero()).then_some(d)
}

/// A Service with its compiled routes.
#[derive(Debug)]
pub struct ServicePolicy {
    /// As received.
    pub service: pb::Service,
    /// Compiled rules, in the destination service's tie-break order.
    pub rules: Vec<Rule>,
    /// Endpoints by backend key, the Service's own under [`ServicePolicy::default_key`].
    pub backends: HashMap<String, Vec<Endpoint>>,
    /// The key of the Service's own endpoints.
    pub default_key: String,
    /// Metric attributes of requests to the Service without a route.
    pub default_labels: Arc<RouteLabels>,
    /// Metric attributes of requests that match no route (Service only).
    pub service_labels: Arc<RouteLabels>,
    /// Backends whose reference does not resolve (answered 500, per Gateway API).
    pub unresolved: std::collections::HashSet<String>,
    /// Retry budget of the Service (shared across updates).
    pub budget: Arc<Budget>,
}

impl ServicePolicy {
    /// Compiles `service`; rules that do not compile are dropped, endpoints
    /// that do not parse are kept unusable ([`Self::warn_new_problems`] says so).
    pub fn compile(service: pb::Service, budget: Arc<Budget>) -> Self {
        let default_key = service
            .default_backend
            .as_ref()
            .map(|b| b.key.clone())
            .unwrap_or_else(|| format!("{}/{}:{}", service.namespace, service.name, service.port));
        let service_name = format!("{}/{}", service.namespace, service.name);
        // One attribute per distinct identity, shared by its endpoints.
        let mut identities: HashMap<String, KeyValue> = HashMap::new();
        let mut parse = |endpoints: &[pb::Endpoint]| -> Vec<Endpoint> {
            endpoints
                .iter()
                .map(|e| {
                    let workload = identities
                        .entry(Endpoint::workload_id(e).to_owned())
                        .or_insert_with_key(|id| telemetry::workload("destination_workload", id))
                        .clone();
                    Endpoint::with_workload(e.clone(), workload)
                })
                .collect()
        };
        let mut backends: HashMap<String, Vec<Endpoint>> = HashMap::new();
        if let Some(b) = &service.default_backend {
            backends.insert(default_key.clone(), parse(&b.endpoints));
        }
        let mut unresolved = std::collections::HashSet::new();
        for b in &service.backends {
            backends.insert(b.key.clone(), parse(&b.endpoints));
            if b.unresolved {
                unresolved.insert(b.key.clone());
            }
        }
        let mut rules = Vec::with_capacity(service.routes.len());
        for r in &service.routes {
            let matches = if r.matches.is_empty() {
                Some(vec![Match {
                    path: PathMatcher::Prefix(String::new()),
                    method: None,
                    headers: Vec::new(),
                    query: Vec::new(),
                }])
            } else {
                r.matches.iter().map(Match::compile).collect::<Option<Vec<_>>>()
            };
            let Some(matches) = matches else {
                continue; // reported by `warn_new_problems`
            };
            rules.push(Rule {
                name: r.name.clone(),
                index: r.rule,
                matches,
                backends: r
                    .backends
                    .iter()
                    .map(|b| RuleBackend {
                        key: b.key.clone(),
                        weight: b.weight,
                        labels: RouteLabels::new(&service_name, &r.name, &b.key),
                    })
                    .collect(),
                labels: RouteLabels::new(&service_name, &r.name, ""),
                request_timeout: duration(&r.request_timeout),
                backend_timeout: duration(&r.backend_request_timeout),
                retry: r.retry.as_ref().filter(|r| r.attempts > 1).map(|r| RetryPolicy {
                    attempts: r.attempts.min(10),
                    codes: r.codes.iter().filter_map(|c| u16::try_from(*c).ok()).collect(),
                    backoff: duration(&r.backoff).unwrap_or(Duration::from_millis(25)),
                }),
            });
        }
        Self {
            default_labels: RouteLabels::new(&service_name, "", &default_key),
            service_labels: RouteLabels::new(&service_name, "", ""),
            service,
            rules,
            backends,
            default_key,
            unresolved,
            budget,
        }
    }

    /// Logs what this update cannot use (endpoints that take no traffic, rules
    /// that do not compile) unless `previous`, the last update of the same
    /// target, had it too: one line per problem rather than one per update.
    pub fn warn_new_problems(&self, previous: Option<&ServicePolicy>) {
        let mut known: Vec<&pb::Endpoint> = previous
            .into_iter()
            .flat_map(|p| p.backends.values().flatten())
            .filter(|e| e.addr.is_none())
            .map(|e| &e.raw)
            .collect();
        for e in self.backends.values().flatten() {
            if e.addr.is_none() && !known.contains(&&e.raw) {
                e.warn_if_unusable();
                known.push(&e.raw);
            }
        }
        for r in &self.service.routes {
            let compiled = self.rules.iter().any(|c| c.name == r.name && c.index == r.rule);
            if !compiled && !previous.is_some_and(|p| p.service.routes.contains(r)) {
                tracing::warn!(route = %r.name, rule = r.rule, "route rule does not compile; ignored");
            }
        }
    }

    /// The rule for `req`: the most specific match across all rules, ties to
    /// the earlier rule; `None` when no rule matches (with no rules at all:
    /// the Service itself; with rules: 404, as GAMMA says).
    pub fn select<B>(&self, req: &Request<B>) -> Option<&Rule> {
        let mut best: Option<(Rank, &Rule)> = None;
        for rule in &self.rules {
            for m in &rule.matches {
                if m.matches(req) {
                    let rank = m.rank();
                    if best.as_ref().is_none_or(|(b, _)| rank > *b) {
                        best = Some((rank, rule));
                    }
                }
            }
        }
        best.map(|(_, r)| r)
    }

    /// Endpoints of a backend (empty for an unknown one).
    pub fn endpoints(&self, key: &str) -> &[Endpoint] {
        self.backends.get(key).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Weighted choice of a backend (per request for HTTP, per connection for TCP).
pub fn split(backends: &[RuleBackend]) -> Option<&RuleBackend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut pick = rand::random_range(0..total);
    for b in backends {
        let w = u64::from(b.weight);
        if pick < w {
            return Some(b);
        }
        pick -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, rule: u32, path: (i32, &str), method: &str, headers: usize) -> pb::Route {
        pb::Route {
            name: name.into(),
            rule,
            matches: vec![pb::RouteMatch {
                path: Some(pb::PathMatch {
                    kind: path.0,
                    value: path.1.into(),
                }),
                headers: (0..headers)
                    .map(|i| pb::HeaderMatch {
                        regex: false,
                        name: format!("x-h{i}"),
                        value: "1".into(),
                    })
                    .collect(),
                query_params: vec![],
                method: method.into(),
            }],
            backends: vec![pb::WeightedBackend {
                key: format!("ns/{name}:80"),
                weight: 1,
            }],
            ..Default::default()
        }
    }

    fn policy(routes: Vec<pb::Route>) -> ServicePolicy {
        ServicePolicy::compile(
            pb::Service {
                name: "svc".into(),
                namespace: "ns".into(),
                port: 80,
                routes,
                ..Default::default()
            },
            Arc::new(Budget::new(0.2, 10, Duration::from_secs(10))),
        )
    }

    /// The log lines `f` writes.
    fn logged(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let w = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let out = lines.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&out).lines().map(str::to_owned).collect()
    }

    #[test]
    fn a_problem_is_logged_once_not_on_every_update() {
        let regex = path_match::Kind::Regex as i32;
        let endpoint = |address: &str| pb::Endpoint {
            address: address.into(),
            port: 80,
            ready: true,
            ..Default::default()
        };
        let update = |addresses: &[&str]| {
            let mut p = policy(vec![
                route("ok", 0, (regex, "/[0-9]+"), "", 0),
                route("bad", 0, (regex, "("), "", 0),
            ]);
            p.service.default_backend = Some(pb::Backend {
                key: p.default_key.clone(),
                endpoints: addresses.iter().map(|a| endpoint(a)).collect(),
                ..Default::default()
            });
            ServicePolicy::compile(p.service, p.budget)
        };
        let first = update(&["10.0.0.1", "10.0.0.300"]);
        let lines = logged(|| first.warn_new_problems(None));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("unusable endpoint address") && l.contains("10.0.0.300"))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("does not compile") && l.contains("bad"))
        );
        assert_eq!(first.rules.len(), 1, "the bad rule is dropped");

        // Another endpoint comes: only what is new is worth a line.
        let second = update(&["10.0.0.1", "10.0.0.300", "10.0.0.2"]);
        assert_eq!(logged(|| second.warn_new_problems(Some(&first))), Vec::<String>::new());
        let third = update(&["10.0.0.1", "10.0.0.300", "10.0.0.2", "not-an-ip"]);
        let lines = logged(|| third.warn_new_problems(Some(&second)));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("not-an-ip"), "{lines:?}");
    }

    fn req(method: &str, uri: &str, headers: &[&str]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for h in headers {
            b = b.header(*h, "1");
        }
        b.body(()).expect("request")
    }

    #[test]
    fn gateway_api_precedence() {
        let (exact, prefix, regex) = (
            path_match::Kind::Exact as i32,
            path_match::Kind::Prefix as i32,
            path_match::Kind::Regex as i32,
        );
        let p = policy(vec![
            route("a", 0, (prefix, "/"), "", 0),
            route("b", 0, (prefix, "/api"), "", 0),
            route("c", 0, (exact, "/api/v1"), "", 0),
            route("d", 0, (prefix, "/api"), "POST", 0),
            route("e", 0, (prefix, "/api"), "", 2),
            route("f", 0, (regex, "/r/[0-9]+"), "", 0),
        ]);
        let name = |r: Request<()>| p.select(&r).map(|r| r.name.clone());
        assert_eq!(name(req("GET", "/other", &[])).as_deref(), Some("a"));
        assert_eq!(name(req("GET", "/api/x", &[])).as_deref(), Some("b"));
        assert_eq!(
            name(req("GET", "/apix", &[])).as_deref(),
            Some("a"),
            "prefix is per path element"
        );
        assert_eq!(
            name(req("GET", "/api/v1", &[])).as_deref(),
            Some("c"),
            "exact beats prefix"
        );
        assert_eq!(
            name(req("POST", "/api/x", &[])).as_deref(),
            Some("d"),
            "method beats no method"
        );
        assert_eq!(
            name(req("GET", "/api/x", &["x-h0", "x-h1"])).as_deref(),
            Some("e"),
            "more headers win"
        );
        assert_eq!(name(req("GET", "/r/42", &[])).as_deref(), Some("f"));
        assert_eq!(name(req("GET", "/r/x", &[])).as_deref(), Some("a"));
    }

    #[test]
    fn no_route_means_the_service_itself() {
        let p = policy(vec![]);
        assert!(p.select(&req("GET", "/", &[])).is_none());
    }

    #[test]
    fn split_follows_weights() {
        let b = |key: &str, weight| RuleBackend {
            key: key.to_owned(),
            weight,
            labels: RouteLabels::none(),
        };
        let backends = vec![b("a", 90), b("b", 10), b("z", 0)];
        let key = || split(&backends).map(|b| b.key.as_str());
        let n = 20_000;
        let a = (0..n).filter(|_| key() == Some("a")).count();
        let share = a as f64 / n as f64;
        assert!((share - 0.9).abs() < 0.015, "{share}");
        assert!((0..1000).all(|_| key() != Some("z")));
        assert!(split(&[b("a", 0)]).is_none());
    }

    #[test]
    fn labels_are_built_once_per_route_and_backend() {
        let mut r = route("canary", 0, (path_match::Kind::Prefix as i32, "/"), "", 0);
        r.name = "shop/canary".into();
        let p = policy(vec![r]);
        let rule = &p.rules[0];
        let h = rule.backends[0].labels.header().expect("header");
        assert_eq!(h, "ns/svc shop/canary ns/canary:80");
        assert_eq!(p.default_labels.header().expect("header"), "ns/svc - ns/svc:80");
        assert_eq!(p.service_labels.header().expect("header"), "ns/svc - -");
    }

    #[test]
    fn each_endpoint_carries_its_workload_attribute_shared_per_identity() {
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let ep = |address: &str, meshed: bool| pb::Endpoint {
            address: address.into(),
            port: 8080,
            identity: id.into(),
            meshed,
            ready: true,
            ..Default::default()
        };
        let p = ServicePolicy::compile(
            pb::Service {
                name: "web".into(),
                namespace: "shop".into(),
                port: 80,
                default_backend: Some(pb::Backend {
                    key: "shop/web:80".into(),
                    endpoints: vec![ep("10.0.0.1", true), ep("10.0.0.2", true), ep("10.0.0.3", false)],
                    ..Default::default()
                }),
                ..Default::default()
            },
            Arc::new(Budget::new(0.2, 10, Duration::from_secs(10))),
        );
        let eps = p.endpoints("shop/web:80");
        let values: Vec<String> = eps.iter().map(|e| e.workload.value.to_string()).collect();
        assert_eq!(values, [id, id, ""], "an unmeshed endpoint's identity is not claimed");
        assert_eq!(eps[0].workload.key.as_str(), "destination_workload");
        let (opentelemetry::Value::String(a), opentelemetry::Value::String(b)) =
            (&eps[0].workload.value, &eps[1].workload.value)
        else {
            panic!("string attributes");
        };
        assert!(std::ptr::eq(a.as_str(), b.as_str()), "one allocation per identity");
    }
}
